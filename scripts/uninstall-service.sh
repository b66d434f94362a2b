#!/bin/sh
# Undo scripts/install-service.sh (run as root).
#
#   scripts/uninstall-service.sh [PREFIX] [--purge]
#
# Stops and disables the units, removes them and the program (PREFIX, default
# /opt/xray-watcher). Config (/etc/xray-watcher) and data (/var/lib/xray-watcher: inbox,
# processed, failed, results, model store) are kept unless --purge, which also removes them
# and the user xray and the groups xray and xray-drop. ROOT=dir works on a fake root as for
# install-service.sh (no systemctl, userdel or groupdel there). DATA=... and ETC=... name
# other folders, as for install-service.sh.
#
# Guards, all checked before anything is removed (exit 2 and nothing removed otherwise):
# each folder is normalised first (trailing and doubled slashes, . and .., and with
# `realpath` the links in the folders above it, within ROOT), so that no spelling of a
# system folder (/opt/, //, /usr/local/../local) gets through; PREFIX must hold
# .venv/bin/xray-watcher or the installer's .xray-watcher-install (or be empty); with
# --purge, DATA must hold inbox/ and model_store/, and ETC a config.yaml with an `inbox:`
# key. A folder that is already gone is skipped.
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
refuse() { printf 'uninstall-service: error: %s\n' "$*" >&2; exit 2; }

if [ -z "$ROOT" ] && [ "$(id -u)" != 0 ]; then
    printf 'uninstall-service: error: run as root (or set ROOT=/some/dir)\n' >&2
    exit 1
fi

system_folder() { # system_folder PATH: true for a folder that is never removed
    case $1 in
    / | /bin | /boot | /dev | /dev/* | /etc | /etc/systemd | /etc/systemd/system | /home | /home/* | \
        /lib | /lib32 | /lib64 | /libx32 | /media | /mnt | /opt | /proc | /proc/* | /root | /root/* | /run | \
        /run/user | /run/user/* | /sbin | /srv | /sys | /sys/* | /tmp | /usr | /usr/bin | /usr/lib | \
        /usr/local | /usr/local/bin | /usr/local/lib | /usr/sbin | /usr/share | /var | /var/cache | \
        /var/lib | /var/log | /var/opt | /var/tmp)
        return 0 ;;
    esac
    return 1
}

# canon NAME PATH: sets $rel (PATH normalised, as seen inside ROOT) and $full (what to remove on
# this host), or refuses. The last component is not followed: rm -rf removes a link, not its
# target.
if realpath -m -s / >/dev/null 2>&1; then have_realpath=yes; else have_realpath=no; fi
base=/
if [ -n "$ROOT" ]; then
    [ -d "$ROOT" ] || refuse "ROOT '$ROOT' is not a folder"
    base=$(cd "$ROOT" && pwd -P)
fi
canon() {
    case $2 in /*) ;; *) refuse "$1 must be an absolute path, got '$2'" ;; esac
    if [ "$have_realpath" = yes ]; then
        rel=$(realpath -m -s -- "$2") # //, /./, /../ and trailing slashes, links not followed
    else
        rel=$(printf '%s\n' "$2" | sed -e 's|//*|/|g' -e 's|\(.\)/$|\1|')
        case $rel/ in */./* | */../*) refuse "$1 '$2' has a . or .. component: give the plain path" ;; esac
    fi
    if system_folder "$rel"; then refuse "refusing to remove $1 $2 (a system folder)"; fi
    if [ "$have_realpath" = yes ]; then # follow links in the folders above it, staying in ROOT
        parent=$(realpath -m -- "$base${rel%/*}")
        case $parent in
        "$base") inner="" ;;
        "${base%/}"/*) inner=${parent#"${base%/}"} ;;
        *) refuse "refusing to remove $1 $2: it resolves to $parent/${rel##*/}, outside ROOT $ROOT" ;;
        esac
        [ "$inner" != / ] || inner=""
        resolved=$inner/${rel##*/}
        if system_folder "$resolved"; then
            refuse "refusing to remove $1 $2 (it resolves to $resolved, a system folder)"
        fi
        full=${parent%/}/${rel##*/}
    else
        full=$ROOT$rel
    fi
}
gone() { [ ! -e "$1" ] && [ ! -L "$1" ]; }

canon PREFIX "$PREFIX"
PREFIX=$rel
prefix_full=$full
if ! gone "$prefix_full" && [ ! -x "$prefix_full/.venv/bin/xray-watcher" ] &&
    [ ! -f "$prefix_full/.xray-watcher-install" ] && [ -n "$(ls -A "$prefix_full")" ]; then
    refuse "refusing to remove PREFIX $PREFIX: it holds neither .venv/bin/xray-watcher nor .xray-watcher-install (not an xray-watcher installation); nothing removed"
fi
if [ "$PURGE" = yes ]; then
    canon DATA "$DATA"
    DATA=$rel
    data_full=$full
    if ! gone "$data_full" && { [ ! -d "$data_full/inbox" ] || [ ! -d "$data_full/model_store" ]; }; then
        refuse "refusing to purge DATA $DATA: it holds no inbox/ and model_store/ (not an xray-watcher data folder); nothing removed"
    fi
    canon ETC "$ETC"
    ETC=$rel
    etc_full=$full
    if ! gone "$etc_full" && ! grep -Eqs '^inbox[[:space:]]*:' "$etc_full/config.yaml"; then
        refuse "refusing to purge ETC $ETC: it holds no config.yaml with an inbox: key (not xray-watcher's configuration); nothing removed"
    fi
fi

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

link="$ROOT/usr/local/bin/xray-watcher"
if [ -L "$link" ]; then
    target=$(readlink "$link" | sed -e 's|//*|/|g')
    if [ "$target" = "$PREFIX/.venv/bin/xray-watcher" ]; then rm -f "$link"; fi
fi
if gone "$prefix_full"; then
    say "$PREFIX is already gone"
else
    rm -rf "$prefix_full"
    say "removed $PREFIX"
fi

if [ "$PURGE" = yes ]; then
    for folder in "$etc_full" "$data_full"; do
        if ! gone "$folder"; then rm -rf "$folder"; fi
    done
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
