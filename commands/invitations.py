"""/invitations and /cancel-invitation: the one-time codes waiting to be used."""
from commands import command


@command("invitations", operator=True)
def invitations(ctx):
    """List the invitations and password resets waiting, by name, with when each stops working.

    The codes themselves are not shown: the server keeps only a hash of each.
    """
    found = ctx.invitations()
    if not found:
        ctx.reply("No invitations are waiting.")
    for waiting in found:
        what = "a new password" if waiting.new_password else "an account"
        ctx.reply(f"{waiting.name}: {what}, by {waiting.by}, until {waiting.expires} ({waiting.left} left)")


@command("cancel-invitation", "NAME", operator=True)
def cancel_invitation(ctx, name):
    """Make the code waiting for NAME (an invitation, or a password reset) stop working."""
    ctx.reply(ctx.cancel_invitation(name))
