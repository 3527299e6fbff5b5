"""/help: the list of commands, or one command in detail."""
from commands import CommandError, command


@command("help", "[COMMAND]")
def show_help(ctx, name):
    """Show the commands, or how to use one of them.

    Without an argument, lists every command with its usage and what it does.
    With a command name (the slash is optional), shows its usage, its other
    names and everything its author wrote about it.
    """
    table = ctx.command_table
    if name is None:
        for line in table.help_lines():
            ctx.reply(line)
        ctx.reply(f"Type {ctx.help_command} COMMAND for more about one. "
                  f"To say something that starts with /, type //.")
        return
    found = table.find(name.lstrip("/"))
    if found is None:
        raise CommandError(f"There is no /{name.lstrip('/')}. Type {ctx.help_command} for the list.")
    ctx.reply(f"{found.usage}  {found.summary}")
    if found.aliases:
        ctx.reply("Also: " + ", ".join(f"/{alias}" for alias in found.aliases))
    if found.operator:
        ctx.reply("Only operators may use it (see /op).")
    for line in found.details.splitlines():
        ctx.reply(line)
