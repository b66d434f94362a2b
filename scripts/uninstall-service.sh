#!/bin/sh
# Undo scripts/install-service.sh (run as root).
#
#   scripts/uninstall-service.sh [PREFIX] [--purge]
#
# Stops and disables the units, removes them and the program (PREFIX, default
# /opt/xray-watcher). Config (/etc/xray-watcher) and data (/var/lib/xray-watcher: inbox,
# processed, failed, results, model store) are kept unless --purge, which also removes them
# and the user xray and the groups xray and xray-drop. ROOT=dir works on a fake root as for
# install-service.sh (no systemctl, userdel or groupdel there).
set -eu

PREFIX=/opt/xray-watcher
PURGE=no
for arg in "$@"; do
    case $arg in
    --purge) PURGE=yes ;;
    /*) PREFIX=$arg ;;
    *) printf 'usage: %s [PREFIX] [--purge]\n' "$0" >&2; exit 2 ;;
    esac
done
ROOT=${ROOT:-}
DATA=${DATA:-/var/lib/xray-watcher}
ETC=${ETC:-/etc/xray-watcher}
UNIT_DIR=/etc/systemd/system
UNITS="xray-watcher.service xray-watcher-listener.service"

say() { printf 'uninstall-service: %s\n' "$*"; }

if [ -z "$ROOT" ] && [ "$(id -u)" != 0 ]; then
    printf 'uninstall-service: error: run as root (or set ROOT=/some/dir)\n' >&2
    exit 1
fi
case $PREFIX in
/ | /opt | /usr | /usr/local | /etc | /var | /var/lib | /home | /srv)
    printf 'uninstall-service: error: refusing to remove PREFIX %s\n' "$PREFIX" >&2
    exit 2
    ;;
esac
systemd_up=no
if [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then systemd_up=yes; fi

for name in $UNITS; do
    [ -e "$ROOT$UNIT_DIR/$name" ] || continue
    if [ "$systemd_up" = yes ]; then
        systemctl disable --now "$name" || true # stops: SIGTERM, the batch in hand is finished
    fi
    rm -f "$ROOT$UNIT_DIR/$name"
    say "removed $UNIT_DIR/$name"
done
rm -rf "$ROOT$UNIT_DIR/xray-watcher.service.d" "$ROOT$UNIT_DIR/xray-watcher-listener.service.d"
if [ "$systemd_up" = yes ]; then systemctl daemon-reload; fi

rm -rf "$ROOT$PREFIX"
link="$ROOT/usr/local/bin/xray-watcher"
if [ -L "$link" ] && [ "$(readlink "$link")" = "$PREFIX/.venv/bin/xray-watcher" ]; then rm -f "$link"; fi
say "removed $PREFIX"

if [ "$PURGE" = yes ]; then
    rm -rf "$ROOT$ETC" "$ROOT$DATA"
    say "purged $ETC and $DATA"
    if [ -z "$ROOT" ]; then
        if getent passwd xray >/dev/null; then userdel xray; fi
        for g in xray-drop xray; do
            if getent group "$g" >/dev/null; then groupdel "$g"; fi
        done
        say "removed the user xray and the groups xray, xray-drop"
    fi
else
    say "kept $ETC and $DATA (results, processed files, models); --purge removes them"
fi
