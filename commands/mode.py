"""/mode: how a room is run."""
from commands import CommandError, command

LISTS = {"ban": "bans", "exempt": "exempts", "invite-mask": "invite_masks"}     # setting -> RoomSettings field


@command("mode", "[#ROOM] [SETTING] [VALUE...]")
def mode(ctx, room, setting, value):
    """Show or change how your current room (or #ROOM) is run; its operators only change it.

    /mode key KEY      people need KEY to join (/join ROOM KEY); /mode key off
    /mode invite-only on|off   only invited people may join (/invite)
    /mode topic operators|everyone   who may set the topic
    /mode op NICK, /mode deop NICK   make someone in the room an operator of it, or not
    /mode limit N|off  the most people the room takes (an /invite lets one more in)
    /mode moderated on|off   only the room's operators and voiced people talk
    /mode voice NICK, /mode devoice NICK   let someone talk in a moderated room, or not
    /mode outside-messages on|off   people not in the room may talk in it (off at first)
    /mode secret on|off   hide the room from everyone outside it
    /mode ban MASK, /mode unban MASK   keep out, and silence, whoever fits NICK!USER@HOST
       (bob, bob!*@*, *!~bot@*); /mode ban alone lists the bans
    /mode exempt MASK, /mode unexempt MASK   whoever fits is not held by the bans
    /mode invite-mask MASK, /mode uninvite-mask MASK   whoever fits may join while it is invite-only
    IRC's letters do the same: /mode +m, /mode +l 50, /mode -l, /mode +v bob, /mode +b bob!*@*,
    /mode +b alone lists the bans (i k t o l m v n s b e I).
    Whoever opens a room is its operator; server operators run every room.
    A room with a key, invite-only or secret is private: not listed to people outside it, and it
    forgets its settings when it empties; other rooms keep theirs across restarts.
    """
    if setting is None:
        ctx.reply(describe(ctx.room_settings(room)))
        return
    if setting[0] in "+-":
        changes = ctx.mode_letters(setting, value.split() if value else [])
    else:
        changes = [(setting.lower(), value)]
    asked = [name for name, given in changes if given is None and name in LISTS]
    for name in asked:
        show_list(ctx, room, name)
    missing = [name for name, given in changes if given is None and name not in LISTS]
    if missing:
        raise CommandError(f"Usage: /mode [#ROOM] {missing[0]} VALUE (see /help mode).")
    changes = [(name, given) for name, given in changes if given is not None]
    if len(changes) == 1:
        ctx.set_mode(*changes[0], room)
    elif changes:
        for problem in ctx.set_modes(changes, room):
            ctx.error(problem)


def describe(settings) -> str:
    """One line: the room's settings, those it always has first."""
    described = ["key" if settings.has_key else "no key",
                 "invite-only" if settings.invite_only else "open to all",
                 "topic by " + ("everyone" if settings.topic_by_everyone else "operators"),
                 "operators: " + (", ".join(settings.operators) or "none")]
    if settings.secret:
        described.append("secret")
    if settings.limit is not None:
        described.append(f"limit {settings.limit}")
    if settings.moderated:
        described.append("moderated, voiced: " + (", ".join(settings.voiced) or "none"))
    if settings.outside_messages:
        described.append("outside messages on")
    for name, field in LISTS.items():
        count = len(getattr(settings, field))
        if count:
            described.append(f"{count} {name} mask{'s' if count > 1 else ''}")
    return f"#{settings.name}: {'; '.join(described)}"


def show_list(ctx, room, name) -> None:
    """The masks of one of the room's lists, with who put each there."""
    settings = ctx.room_settings(room)
    masks = getattr(settings, LISTS[name])
    if not masks:
        ctx.reply(f"#{settings.name} has no {name} masks.")
    for mask in masks:
        ctx.reply(f"#{settings.name} {name} {mask.mask} (by {mask.by})")
