"""/sessions and /kick-session: the connections signed in to your account."""
from commands import command


@command("sessions", "")
def sessions(ctx):
    """List your sessions: each device or client signed in to your account, with its number.

    Everything one session does shows on the others; /kick-session N ends a
    session that was left open somewhere.
    """
    for session in ctx.sessions():
        ctx.reply(f"{session.number}: {session.protocol} from {session.address}, since {session.since}, "
                  f"idle {session.idle}" + (" (this one)" if session.this else ""))


@command("kick-session", "N")
def kick_session(ctx, number):
    """End your session number N (see /sessions), such as one left open on another device."""
    if not number.isdigit():
        ctx.error(f"N is a session's number from /sessions, not {number!r}.")
        return
    ctx.reply(ctx.end_session(int(number)))
