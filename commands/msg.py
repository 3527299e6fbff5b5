"""/msg: a private message."""
from commands import command


@command("msg", usage="/msg NICK TEXT...", aliases=("w", "tell"))
def private_message(ctx, nick, text):
    """Send a private message that only NICK sees.

    You get a copy marked [pm to NICK]; they see it marked [pm from YOU] and
    can answer with /reply. If they are away, you are told why.
    """
    ctx.send_private(nick, text)
