#!/bin/sh
# Sync this laptop with headquarters now, and keep the window open so the
# result can be read. A desktop shortcut (mailsync-sync.desktop) runs it.
# Adjust MAILSYNC_CONFIG (and where mailsync is installed) to this machine.
: "${MAILSYNC_CONFIG:=$HOME/mailsync/mailsync.toml}"
export MAILSYNC_CONFIG
MAILSYNC="${MAILSYNC:-$HOME/mailsync/.venv/bin/mailsync}"

"$MAILSYNC" sync
rc=$?
echo
"$MAILSYNC" status
if [ "$rc" -ne 0 ]; then
    echo
    echo "The sync did not finish cleanly (exit code $rc): see the lines above,"
    echo "or 'mailsync log --since 1d --level warning'. Your data is safe; try again"
    echo "when the connection is back."
fi
printf '\nPress Enter to close. '
read -r _
