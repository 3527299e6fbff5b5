"""/reset-password: a way back into an account whose password was forgotten."""
from commands import command


@command("reset-password", "NAME", operator=True)
def reset_password(ctx, name):
    """Print a one-time code that lets the owner of the account NAME choose a new password.

    They sign in as NAME with the pyChat client (or nc) and give the code at
    the password prompt instead of their password; they are then asked for
    a new one. It works once, for 7 days; their old password works until it
    is used, and /cancel-invitation NAME takes it back. Give it to them
    privately.
    """
    ctx.reply(ctx.reset_password(name))
