"""/quit: leave the chat."""
from commands import command


@command("quit", "[MESSAGE...]", aliases=("exit", "bye"))
def quit_chat(ctx, message):
    """Leave the chat, with an optional goodbye that the room sees."""
    ctx.quit(message)
