"""The one exception type for problems a user can cause and fix."""


class GptlabError(Exception):
    """A bad path, flag, file or value. The message names the problem and the fix;
    the command line prints it alone (no traceback) and exits with status 1."""
