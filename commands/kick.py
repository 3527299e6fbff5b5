"""/kick: put someone out of a room."""
from commands import command


@command("kick", "[#ROOM] NICK [REASON...]")
def kick(ctx, room, nick, reason):
    """Put NICK out of your current room (or #ROOM); operators of the room only.

    They and the room see who did it and why. They stay in the chat, and can
    come back unless the room has a key or is invite-only. To disconnect
    someone from the server, a server operator uses /disconnect.
    """
    ctx.reply(f"Kicked {ctx.kick(nick, reason, room)}.")
