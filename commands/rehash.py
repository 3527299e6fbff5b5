"""/rehash: reload the server's configuration without a restart."""
from commands import command


@command("rehash", operator=True)
def rehash(ctx):
    """Read the configuration file, the TLS certificate and the message of the day again, as SIGHUP does.

    What can change while the server runs changes at once (limits, operators named in the file, the
    message of the day, the log level, the certificate for new connections); the reply says what changed
    and what needs a restart (ports, host, data directory, history). Nobody is disconnected. A file with
    a mistake in it changes nothing, and the reply says what is wrong.
    """
    for line in ctx.reload():
        ctx.reply(line)
