"""/oper: which accounts are operators of the server, and changing that."""
from commands import CommandError, command


@command("oper", "[ACTION] [NAME]", operator=True)
def oper(ctx, action, name):
    """List the operators' accounts; /oper add NAME or /oper remove NAME changes who they are.

    NAME must be a registered account. Operators named with --operator when
    the server started stay operators; others are kept in the data directory.
    """
    if action is None:
        ctx.reply("Operators: " + (", ".join(ctx.operators()) or "none by account"))
    elif action in ("add", "remove") and name is not None:
        ctx.reply(ctx.set_operator(name, action == "add"))
    else:
        raise CommandError("Usage: /oper, /oper add NAME or /oper remove NAME.")
