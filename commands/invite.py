"""/invite: let someone into a private room."""
from commands import command


@command("invite", "NICK [ROOM]")
def invite(ctx, nick, room):
    """Invite NICK to your current room (or ROOM): they may join it past its key or invite-only.

    They are told how to accept. In an invite-only room, only its operators
    may invite.
    """
    name = ctx.invite(nick, room)
    ctx.reply(f"Invited {name} to #{(room or ctx.room).lstrip('#')}.")
