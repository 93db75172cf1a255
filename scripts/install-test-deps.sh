#!/usr/bin/env bash
# Installs what the test suite needs from Debian's packages, where missing.
# Non-interactive; installs only as root. Without root it says what is
# missing and exits 0: the tests then skip (or, in CI, fail) with a message.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

missing=()

# need_pkg CHECK PACKAGE... : queue PACKAGEs unless the shell test CHECK passes
need_pkg() {
    local check=$1
    shift
    if ! eval "$check" >/dev/null 2>&1; then
        missing+=("$@")
    fi
}

need_pkg 'ls /usr/lib/postgresql/*/bin/postgres || command -v postgres' postgresql
need_pkg 'command -v postfix' postfix
need_pkg 'command -v dovecot && command -v doveadm' dovecot-core
need_pkg 'test -e /usr/lib/dovecot/imap' dovecot-imapd
need_pkg 'test -e /usr/lib/dovecot/pop3' dovecot-pop3d
need_pkg 'test -e /usr/lib/dovecot/lmtp' dovecot-lmtpd
need_pkg 'command -v openssl' openssl

if [ ${#missing[@]} -eq 0 ]; then
    echo "test dependencies present"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "missing test dependencies (install as root): apt-get install ${missing[*]}" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "missing test dependencies (no apt-get here; install them yourself): ${missing[*]}" >&2
    exit 0
fi
echo "installing test dependencies: ${missing[*]}"
# Postfix asks what kind of mail server this is: it is none (the tests
# write their own config and start it themselves).
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "test dependencies installed"
