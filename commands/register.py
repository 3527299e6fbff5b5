"""/register, /passwd and /unregister: a nickname of your own, kept with a password."""
from commands import command


@command("register", "PASSWORD...")
def register(ctx, password):
    """Reserve your nickname: from now on, signing in with it asks for PASSWORD.

    Look-alike spellings of your nickname are reserved with it. The password
    needs at least 8 characters, 4 of them different, and must not contain
    your nickname; the server keeps only a salted scrypt hash of it.
    """
    ctx.reply(ctx.register(password))


@command("passwd", "OLD NEW")
def change_password(ctx, old, new):
    """Change the password of your account from OLD to NEW (one word each)."""
    ctx.change_password(old, new)
    ctx.reply("Password changed.")


@command("unregister", "PASSWORD...")
def unregister(ctx, password):
    """Give up your account: your nickname is free for anyone again.

    Messages waiting for you and operator rights that came with the account
    go with it.
    """
    ctx.reply(ctx.unregister(password))
