"""The one exception type a user sees as a single line from the CLI.

It lives in ``hw`` because dependencies point one way (``sw`` -> ``sim`` -> ``hw``) and
every layer raises it.
"""


class M3VitError(Exception):
    """A problem with the user's input or environment, reported as one line.

    Raised for bad configurations, unknown presets or tasks, unreadable checkpoints and
    missing tools. The CLI prints ``m3vit: error: <message>`` and exits with status 2;
    anything else that escapes is a bug in the toolkit and keeps its traceback.
    """
