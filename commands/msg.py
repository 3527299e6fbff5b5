"""/msg: a private message, or a line to one of your rooms."""
from commands import command


@command("msg", "NICK TEXT...", aliases=("w", "tell"))
def private_message(ctx, nick, text):
    """Send a private message that only NICK sees; /msg #ROOM TEXT says TEXT in a room of yours.

    You get a copy marked [pm to NICK]; they see it marked [pm from YOU] and
    can answer with /reply. If they are away, you are told why. With #ROOM,
    the line goes to that room without making it your current one.
    """
    if nick.startswith("#"):
        ctx.say(text, nick)
    else:
        ctx.send_private(nick, text)
