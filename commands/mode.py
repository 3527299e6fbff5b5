"""/mode: how a room is run."""
from commands import CommandError, command


@command("mode", "[#ROOM] [SETTING] [VALUE]")
def mode(ctx, room, setting, value):
    """Show or change how your current room (or #ROOM) is run; its operators only change it.

    /mode key KEY      people need KEY to join (/join ROOM KEY); /mode key off
    /mode invite-only on|off   only invited people may join (/invite)
    /mode topic operators|everyone   who may set the topic
    /mode op NICK, /mode deop NICK   make someone in the room an operator of it, or not
    Whoever opens a room is its operator; server operators run every room.
    Private rooms are not listed to people outside them.
    """
    if setting is None:
        settings = ctx.room_settings(room)
        described = ["key" if settings.has_key else "no key",
                     "invite-only" if settings.invite_only else "open to all",
                     "topic by " + ("everyone" if settings.topic_by_everyone else "operators"),
                     "operators: " + (", ".join(settings.operators) or "none")]
        ctx.reply(f"#{settings.name}: {'; '.join(described)}")
        return
    if value is None:
        raise CommandError(f"Usage: /mode [#ROOM] {setting} VALUE (see /help mode).")
    ctx.set_mode(setting.lower(), value, room)
