"""/read: say that you have read a room or a private conversation."""
from commands import CommandError, command


@command("read", "[WHERE]")
def read(ctx, where):
    """Mark everything said in WHERE (a room, or a nickname; your current room without it) as read.

    The pyChat client sends it for you while you are at the terminal, so it
    answers nothing, not even when WHERE is no room or conversation of yours
    (any more). Your other sessions are told, and what you have read is not
    shown to you again when you next sign in.
    """
    try:
        ctx.mark_read(where)
    except CommandError:
        pass
