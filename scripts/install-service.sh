#!/bin/sh
# Install xray-watcher as a hardened systemd service (run as root).
#
#   scripts/install-service.sh [PREFIX]        PREFIX: the program's folder (default /opt/xray-watcher)
#
# Lays out (see the top of systemd/xray-watcher.service):
#   PREFIX/.venv                        python3 -m venv + pip install SOURCE (the repo, or a wheel)
#   /etc/xray-watcher/config.yaml       root:xray 0640, absolute paths into /var/lib/xray-watcher
#   /var/lib/xray-watcher/inbox         xray:xray-drop 2770 (members of xray-drop may drop files)
#   /var/lib/xray-watcher/{processed,failed,results,model_store}   xray:xray 0750
#   /etc/systemd/system/xray-watcher.service (+ xray-watcher-listener.service if the repo has one)
#   /usr/local/bin/xray-watcher         a link to PREFIX/.venv/bin/xray-watcher
# creates the system user xray (group xray) and the group xray-drop, and runs
# `systemctl daemon-reload` when systemd is running. It never starts the service.
# Re-running it upgrades the program and the units; config.yaml and data are kept.
#
# Environment:
#   SOURCE=path     a repo folder or a wheel to install (default: the repo holding this script)
#   ROOT=dir        stage into a fake root (DESTDIR-style): no useradd, chown or systemctl
#   VENV=skip       do not create or update the venv (tests, or a venv managed elsewhere)
#   PYTHON=python3  the interpreter for the venv (not one under /home or /root: ProtectHome=yes
#                   hides those from the service)
#   PIP_ARGS=...    extra pip arguments (e.g. --no-index --find-links /srv/wheels)
#   GPU=auto|yes|no install systemd/gpu.conf as a drop-in (auto: when /dev/nvidiactl exists)
#   DATA=/var/lib/xray-watcher  ETC=/etc/xray-watcher   other folders (the unit is rewritten)
set -eu

PREFIX=${1:-/opt/xray-watcher}
ROOT=${ROOT:-}
DATA=${DATA:-/var/lib/xray-watcher}
ETC=${ETC:-/etc/xray-watcher}
PYTHON=${PYTHON:-python3}
PIP_ARGS=${PIP_ARGS:-}
VENV=${VENV:-create}
GPU=${GPU:-auto}
USER_NAME=xray
DROP_GROUP=xray-drop
HERE=$(cd "$(dirname "$0")/.." && pwd)
SOURCE=${SOURCE:-$HERE}
UNIT_DIR=/etc/systemd/system

say() { printf 'install-service: %s\n' "$*"; }
die() { printf 'install-service: error: %s\n' "$*" >&2; exit 1; }

case $PREFIX in /*) ;; *) die "PREFIX must be an absolute path, got '$PREFIX'" ;; esac
if [ -z "$ROOT" ] && [ "$(id -u)" != 0 ]; then
    die "run as root (or set ROOT=/some/dir to stage into a fake root)"
fi
[ -e "$SOURCE" ] || die "SOURCE '$SOURCE' does not exist"
[ -f "$HERE/systemd/xray-watcher.service" ] || die "no systemd/xray-watcher.service beside this script"

# fake root: modes only; real root: owners too
own() { # own USER:GROUP MODE PATH...
    _owner=$1 _mode=$2
    shift 2
    if [ -z "$ROOT" ]; then chown "$_owner" "$@"; fi
    chmod "$_mode" "$@" # after chown, which may clear a setgid bit
}

# --- users and groups
if [ -z "$ROOT" ]; then
    getent group "$USER_NAME" >/dev/null || groupadd --system "$USER_NAME"
    getent group "$DROP_GROUP" >/dev/null || groupadd --system "$DROP_GROUP"
    if ! getent passwd "$USER_NAME" >/dev/null; then
        useradd --system --gid "$USER_NAME" --groups "$DROP_GROUP" --home-dir "$DATA" --no-create-home \
            --shell /usr/sbin/nologin --comment "xray-watcher daemon" "$USER_NAME"
        say "created system user $USER_NAME and group $DROP_GROUP"
    fi
else
    say "fake root $ROOT: users, owners and systemctl skipped"
fi

# --- the program
mkdir -p "$ROOT$PREFIX"
chmod 0755 "$ROOT$PREFIX"
if [ "$VENV" != skip ]; then
    [ -x "$ROOT$PREFIX/.venv/bin/python" ] || "$PYTHON" -m venv "$ROOT$PREFIX/.venv"
    # shellcheck disable=SC2086  # PIP_ARGS is a list of words
    "$ROOT$PREFIX/.venv/bin/pip" install --quiet --upgrade $PIP_ARGS "$SOURCE"
    say "installed $SOURCE into $PREFIX/.venv"
fi
[ -f "$HERE/README.md" ] && install -m 0644 "$HERE/README.md" "$ROOT$PREFIX/README.md"
# the command on PATH for administrators (status, models, check); not replaced if foreign
link="$ROOT/usr/local/bin/xray-watcher"
if [ ! -e "$link" ] && [ ! -L "$link" ]; then
    mkdir -p "$ROOT/usr/local/bin"
    ln -s "$PREFIX/.venv/bin/xray-watcher" "$link"
elif [ "$(readlink "$link" || true)" != "$PREFIX/.venv/bin/xray-watcher" ]; then
    say "left $link alone (it is not ours)"
fi

# --- data folders (never emptied; modes and owners are reasserted)
mkdir -p "$ROOT$DATA"
own root:root 0755 "$ROOT$DATA"
for d in processed failed results model_store; do
    mkdir -p "$ROOT$DATA/$d"
    own "$USER_NAME:$USER_NAME" 0750 "$ROOT$DATA/$d"
done
mkdir -p "$ROOT$DATA/inbox"
own "$USER_NAME:$DROP_GROUP" 2770 "$ROOT$DATA/inbox" # setgid: dropped files keep group xray-drop
if [ -z "$ROOT" ] && command -v setfacl >/dev/null 2>&1; then
    # whatever the dropper's umask, the daemon may read (and hard-link, not copy) new files
    setfacl -m "d:u:$USER_NAME:rw,d:g:$DROP_GROUP:rw" "$ROOT$DATA/inbox" 2>/dev/null ||
        say "no ACLs on $DATA (files must be group-readable: droppers need umask 0027 or laxer)"
fi

# --- config.yaml and a first model: from `xray-watcher init` when it exists, else the repo's
mkdir -p "$ROOT$ETC"
own "root:$USER_NAME" 0750 "$ROOT$ETC"
XW=${XW:-$ROOT$PREFIX/.venv/bin/xray-watcher}
template=""
seed=""
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ -x "$XW" ] && "$XW" init --help >/dev/null 2>&1 && "$XW" init "$work/init" >/dev/null 2>&1; then
    [ -f "$work/init/config.yaml" ] && template="$work/init/config.yaml"
    [ -d "$work/init/model_store" ] && seed="$work/init/model_store"
    say "config template from 'xray-watcher init'"
fi
if [ -z "$template" ] && [ -f "$HERE/config.yaml" ]; then template="$HERE/config.yaml"; fi
if [ -z "$seed" ] && [ -f "$HERE/model_store/CURRENT" ]; then seed="$HERE/model_store"; fi

config="$ROOT$ETC/config.yaml"
if [ -e "$config" ]; then
    say "kept $ETC/config.yaml (compare with the template: $template)"
elif [ -n "$template" ]; then
    # absolute paths into DATA for the top-level folder keys; heat maps go beside the results
    sed -E \
        -e "s|^inbox:[^#]*|inbox: $DATA/inbox  |" \
        -e "s|^processed:[^#]*|processed: $DATA/processed  |" \
        -e "s|^failed:[^#]*|failed: $DATA/failed  |" \
        -e "s|^results:[^#]*|results: $DATA/results/results.csv  |" \
        -e "s|^model_store:[^#]*|model_store: $DATA/model_store  |" \
        -e "s|^(  folder:)[^#]*|\1 $DATA/results/heatmaps  |" \
        "$template" >"$config.tmp"
    grep -q "^results: $DATA/results/results.csv" "$config.tmp" || die "could not set the paths in $template"
    if ! grep -q "^explain:" "$config.tmp"; then # heat maps (when enabled) must land in a writable folder
        printf '\nexplain:\n  enabled: false\n  folder: %s\n' "$DATA/results/heatmaps" >>"$config.tmp"
    fi
    mv "$config.tmp" "$config"
    own "root:$USER_NAME" 0640 "$config"
    say "wrote $ETC/config.yaml"
else
    die "no config template: neither 'xray-watcher init' nor $HERE/config.yaml"
fi

if [ -n "$(ls -A "$ROOT$DATA/model_store")" ]; then
    say "kept the model store $DATA/model_store"
elif [ -n "$seed" ]; then
    cp -R "$seed/." "$ROOT$DATA/model_store/"
    rm -rf "$ROOT$DATA/model_store"/.build-*
    if [ -z "$ROOT" ]; then chown -R "$USER_NAME:$USER_NAME" "$ROOT$DATA/model_store"; fi
    chmod -R u+rwX,g+rX,g-w,o-rwx "$ROOT$DATA/model_store"
    say "seeded $DATA/model_store from $seed"
else
    say "the model store is empty: train one (xray-watcher train --store $DATA/model_store ...)"
fi

# --- units, rewritten where the folders are not the defaults
mkdir -p "$ROOT$UNIT_DIR"
for name in xray-watcher.service xray-watcher-listener.service; do
    [ -f "$HERE/systemd/$name" ] || continue
    sed -e "s|/opt/xray-watcher|$PREFIX|g" -e "s|/var/lib/xray-watcher|$DATA|g" \
        -e "s|/etc/xray-watcher|$ETC|g" "$HERE/systemd/$name" >"$ROOT$UNIT_DIR/$name.tmp"
    chmod 0644 "$ROOT$UNIT_DIR/$name.tmp"
    mv "$ROOT$UNIT_DIR/$name.tmp" "$ROOT$UNIT_DIR/$name"
    say "installed $UNIT_DIR/$name"
done
if [ "$GPU" = yes ] || { [ "$GPU" = auto ] && [ -e /dev/nvidiactl ]; }; then
    install -D -m 0644 "$HERE/systemd/gpu.conf" "$ROOT$UNIT_DIR/xray-watcher.service.d/gpu.conf"
    say "installed the GPU drop-in $UNIT_DIR/xray-watcher.service.d/gpu.conf"
fi

if [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then # systemd is PID 1
    systemctl daemon-reload
    say "next: systemctl enable --now xray-watcher && xray-watcher status --config $ETC/config.yaml"
else
    say "systemd is not running here (or a fake root): no daemon-reload"
fi
