"""/invite-account and /remove-account: who may sign in to a --private server."""
from commands import command


@command("invite-account", "NAME", operator=True)
def invite_account(ctx, name):
    """Let NAME into this server: prints a one-time code they give when they first sign in as NAME.

    With the code they choose their password; the code then stops working.
    It works for 7 days, and a new invitation replaces the old one.
    """
    ctx.reply(ctx.invite_account(name))


@command("remove-account", "NAME", operator=True)
def remove_account(ctx, name):
    """Take NAME's account (or their unused invitation) away; on a --private server they are disconnected."""
    ctx.reply(ctx.remove_account(name))
