"""/accounts, /invite-account and /remove-account: the accounts, and who may sign in to a --private server."""
from commands import command


@command("accounts", "[PATTERN]", operator=True)
def accounts(ctx, pattern):
    """List the accounts (or those whose name fits PATTERN: * stands for any letters, ? for one).

    Each with when it was registered, when its owner was last seen (signing
    in or out), and whether it is an operator or banned.
    """
    found, total = ctx.accounts(pattern)
    if not found:
        ctx.reply(f"No account fits {pattern}." if pattern else "No accounts.")
        return
    ctx.reply(f"{total} {'account' if total == 1 else 'accounts'}" + (f" fitting {pattern}:" if pattern else ":"))
    for account in found:
        seen = "online now" if account.online else f"last seen {account.last_seen or 'unknown'}"
        ctx.reply(f"{account.name}: registered {account.registered}, {seen}"
                  + (", operator" if account.operator else "")
                  + (f", banned {account.banned}" if account.banned else ""))
    if total > len(found):
        ctx.reply(f"... and {total - len(found)} more; /accounts PATTERN narrows the list.")


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
