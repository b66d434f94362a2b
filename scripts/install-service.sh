#!/bin/sh
# Install xray-watcher as a hardened systemd service (run as root).
#
#   scripts/install-service.sh [PREFIX]        PREFIX: the program's folder (default /opt/xray-watcher)
#
# Lays out (see the top of systemd/xray-watcher.service):
#   PREFIX/.venv                        python3 -m venv + pip install SOURCE (the repo, or a wheel)
#   PREFIX/.xray-watcher-install        what is installed (version, source, sha256, folders); the
#                                       mark uninstall-service.sh looks for
#   /etc/xray-watcher/config.yaml       root:xray 0640, absolute paths into /var/lib/xray-watcher
#   /etc/xray-watcher/config.yaml.dist  root:xray 0640, this version's template (the same paths),
#                                       replaced on each run: diff it with a kept config.yaml
#   /var/lib/xray-watcher/inbox         xray:xray-drop 2770 (members of xray-drop may drop files)
#   /var/lib/xray-watcher/{processed,failed,results,model_store}   xray:xray 0750
#   /etc/systemd/system/xray-watcher.service (+ xray-watcher-listener.service if the repo has one)
#   /usr/local/bin/xray-watcher         a link to PREFIX/.venv/bin/xray-watcher
# creates the system user xray (group xray) and the group xray-drop, and runs
# `systemctl daemon-reload` when systemd is running. It never starts the service.
# Re-running it upgrades the program and the units; config.yaml and data are kept.
#
# Environment:
#   SOURCE=path     a repo folder or a wheel to install (default: the repo holding this script);
#                   always reinstalled, also when its version is the one installed (a rebuilt wheel)
#   ROOT=dir        stage into a fake root (DESTDIR-style): no useradd, chown or systemctl
#   VENV=skip       do not create or update the venv (tests, or a venv managed elsewhere)
#   PYTHON=python3  the interpreter for the venv. Refused when it (or the venv's pyvenv.cfg
#                   `home`) lies under /home, /root or /run/user: ProtectHome=yes hides those
#                   from the service, which then cannot start
#   ALLOW_HOME_PYTHON=1  accept such an interpreter anyway (a warning): for test suites that
#                   run as root with a pyenv Python under /root, never for a real service
#   PIP_ARGS=...    extra pip arguments (e.g. --no-index --find-links /srv/wheels)
#   GPU=auto|yes|no install systemd/gpu.conf as a drop-in (auto: when /dev/nvidiactl exists)
#   DATA=/var/lib/xray-watcher  ETC=/etc/xray-watcher   other folders (the unit is rewritten)
# PREFIX, DATA and ETC must be plain absolute paths: no whitespace, none of | & \ % $ " '
# (unit files split or expand them), not a system folder such as /opt or /var/lib, not under
# /home, /root or /run/user, and not one inside another.
#
# After installing, `xray-watcher check --config ETC/config.yaml` (as the user xray; in a fake
# root on a copy pointed into it) tells whether the installed version accepts the config and
# loads the current model. Exit status: 0 installed and checked (or nothing to check yet);
# 1 failed; 2 refused (a path or interpreter above, nothing changed); 3 installed, but the
# check fails: either the config (compare it with ETC/config.yaml.dist, this version's
# template; the service would stop with exit 2) or the current model (the service would
# fall back to the version promoted before it, DEGRADED): fix it before (re)starting.
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
refuse() { printf 'install-service: error: %s\n' "$*" >&2; exit 2; }

# --- the folders: refused before anything is changed
hidden_by_protecthome() { # hidden_by_protecthome PATH: true where ProtectHome=yes hides PATH
    case $1/ in /home/* | /root/* | /run/user/*) return 0 ;; esac
    return 1
}
checked() { # checked NAME VALUE: sets $path to VALUE without trailing or doubled slashes, or refuses
    case $2 in
    *[[:space:]]* | *'|'* | *'&'* | *\\* | *'%'* | *'$'* | *'"'* | *"'"*)
        refuse "$1 '$2' contains whitespace or one of | & \\ % \$ \" ' (the unit files would split or expand it)" ;;
    /*) ;;
    *) refuse "$1 must be an absolute path, got '$2'" ;;
    esac
    path=$(printf '%s\n' "$2" | sed -e 's|//*|/|g' -e 's|\(.\)/$|\1|')
    case $path/ in */./* | */../*) refuse "$1 '$2' has a . or .. component: give the plain path" ;; esac
    case $path in
    / | /bin | /boot | /dev | /dev/* | /etc | /etc/systemd | /etc/systemd/system | /home | /lib | /lib32 | \
        /lib64 | /libx32 | /media | /mnt | /opt | /proc | /proc/* | /root | /run | /sbin | /srv | /sys | /sys/* | \
        /tmp | /usr | /usr/bin | /usr/lib | /usr/local | /usr/local/bin | /usr/local/lib | /usr/sbin | \
        /usr/share | /var | /var/cache | /var/lib | /var/log | /var/opt | /var/tmp)
        refuse "$1 '$2' is a system folder: give a folder of its own (e.g. /opt/xray-watcher)" ;;
    esac
    if hidden_by_protecthome "$path"; then
        refuse "$1 '$2' lies under /home, /root or /run/user, which ProtectHome=yes hides from the service"
    fi
}
checked PREFIX "$PREFIX"
PREFIX=$path
checked DATA "$DATA"
DATA=$path
checked ETC "$ETC"
ETC=$path
apart() { # apart NAME PATH NAME2 PATH2: refuse PATH at or under PATH2
    case $2/ in "$4"/*) refuse "$1 $2 lies inside $3 $4: keep the three folders apart (the service may write all of DATA; uninstalling removes PREFIX)" ;; esac
}
apart PREFIX "$PREFIX" DATA "$DATA"
apart DATA "$DATA" PREFIX "$PREFIX"
apart ETC "$ETC" DATA "$DATA"
apart DATA "$DATA" ETC "$ETC"
apart ETC "$ETC" PREFIX "$PREFIX"
apart PREFIX "$PREFIX" ETC "$ETC"

if [ -z "$ROOT" ] && [ "$(id -u)" != 0 ]; then
    die "run as root (or set ROOT=/some/dir to stage into a fake root)"
fi
[ -e "$SOURCE" ] || die "SOURCE '$SOURCE' does not exist"
if [ -n "$ROOT" ]; then # absolute: the check below runs from /
    mkdir -p "$ROOT"
    ROOT=$(cd "$ROOT" && pwd -P)
fi
[ -f "$HERE/systemd/xray-watcher.service" ] || die "no systemd/xray-watcher.service beside this script"

# --- the interpreter the service will run: refused before anything is changed
venv=$ROOT$PREFIX/.venv
hidden_interpreter() { # hidden_interpreter PATH WHAT: refuse (or warn) when PATH is under a home
    _p=$1
    if [ -n "$ROOT" ]; then # a copied interpreter inside the fake root is judged by its path there
        _r=$(readlink -f "$ROOT")
        case $_p in "$_r"/*) _p=${_p#"$_r"} ;; esac
    fi
    hidden_by_protecthome "$_p" || return 0
    if [ "${ALLOW_HOME_PYTHON:-}" = 1 ]; then
        [ -n "${home_python_warned:-}" ] ||
            say "warning: $2 $_p lies under /home, /root or /run/user: the service cannot run it (ProtectHome=yes); accepted because ALLOW_HOME_PYTHON=1"
        home_python_warned=yes
        return 0
    fi
    refuse "$2 $_p lies under /home, /root or /run/user, which ProtectHome=yes hides from the service: use a system python (PYTHON=/usr/bin/python3; remove $PREFIX/.venv if it was made from this one), or ALLOW_HOME_PYTHON=1 for a test"
}
check_venv() { # the interpreter the unit's ExecStart would run, and the one the venv was made from
    [ -e "$venv/bin/python" ] || [ -L "$venv/bin/python" ] || return 0
    hidden_interpreter "$(readlink -f "$venv/bin/python" || readlink "$venv/bin/python")" "the venv's interpreter"
    _home=$(sed -n 's/^home[[:space:]]*=[[:space:]]*//p' "$venv/pyvenv.cfg" 2>/dev/null | head -n 1)
    [ -z "$_home" ] || hidden_interpreter "$_home" "the venv's base interpreter (pyvenv.cfg home =)"
}
version=""
if [ "$VENV" != skip ] && [ ! -x "$venv/bin/python" ]; then
    _py=$(command -v "$PYTHON") || die "no interpreter '$PYTHON' (set PYTHON=...)"
    hidden_interpreter "$(readlink -f "$_py")" "PYTHON=$PYTHON:"
fi
check_venv # an existing venv (also with VENV=skip)

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
    [ -x "$venv/bin/python" ] || { "$PYTHON" -m venv "$venv" && check_venv; }
    # the dependencies (and SOURCE where its version is newer); then SOURCE itself, always: pip
    # skips a wheel whose version is the one installed, so a rebuilt 0.1.0 would change nothing
    # shellcheck disable=SC2086  # PIP_ARGS is a list of words
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade $PIP_ARGS "$SOURCE"
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps $PIP_ARGS "$SOURCE"
    version=$("$venv/bin/python" -c 'from importlib.metadata import version; print(version("xray-watcher"))')
    if [ -f "$SOURCE" ]; then
        sha=$(sha256sum "$SOURCE" | cut -d ' ' -f 1)
        say "installed xray-watcher $version into $PREFIX/.venv from $SOURCE (sha256 $sha)"
    else
        sha=""
        say "installed xray-watcher $version into $PREFIX/.venv from $SOURCE"
    fi
    # what is installed, for people; uninstall-service.sh also takes it as the sign of PREFIX
    printf 'xray-watcher %s\nsource: %s\nsha256: %s\ninstalled: %s\ndata: %s\netc: %s\n' \
        "$version" "$SOURCE" "${sha:--}" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$DATA" "$ETC" >"$ROOT$PREFIX/.xray-watcher-install"
elif [ ! -e "$ROOT$PREFIX/.xray-watcher-install" ]; then
    printf 'xray-watcher (venv managed elsewhere: VENV=skip)\ndata: %s\netc: %s\n' "$DATA" "$ETC" >"$ROOT$PREFIX/.xray-watcher-install"
fi
chmod 0644 "$ROOT$PREFIX/.xray-watcher-install"
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
dist="$ROOT$ETC/config.yaml.dist" # this version's template with the paths set: replaced on each run
if [ -n "$template" ]; then
    # absolute paths into DATA for the top-level folder keys; heat maps go beside the results
    sed -E \
        -e "s|^inbox:[^#]*|inbox: $DATA/inbox  |" \
        -e "s|^processed:[^#]*|processed: $DATA/processed  |" \
        -e "s|^failed:[^#]*|failed: $DATA/failed  |" \
        -e "s|^results:[^#]*|results: $DATA/results/results.csv  |" \
        -e "s|^model_store:[^#]*|model_store: $DATA/model_store  |" \
        -e "s|^(  folder:)[^#]*|\1 $DATA/results/heatmaps  |" \
        "$template" >"$dist.tmp"
    grep -q "^results: $DATA/results/results.csv" "$dist.tmp" || die "could not set the paths in $template"
    if ! grep -q "^explain:" "$dist.tmp"; then # heat maps (when enabled) must land in a writable folder
        printf '\nexplain:\n  enabled: false\n  folder: %s\n' "$DATA/results/heatmaps" >>"$dist.tmp"
    fi
    own "root:$USER_NAME" 0640 "$dist.tmp"
    mv "$dist.tmp" "$dist"
    say "wrote $ETC/config.yaml.dist (the template of this version)"
fi
if [ -e "$config" ]; then
    if [ -n "$template" ]; then
        say "kept $ETC/config.yaml (new keys and defaults: diff -u $ETC/config.yaml $ETC/config.yaml.dist)"
    else
        say "kept $ETC/config.yaml"
    fi
elif [ -n "$template" ]; then
    cp "$dist" "$config.tmp"
    own "root:$USER_NAME" 0640 "$config.tmp"
    mv "$config.tmp" "$config"
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
    if [ "$seed" = "$work/init/model_store" ]; then seed="the model bundled with xray-watcher"; fi
    say "seeded $DATA/model_store with $seed"
else
    say "the model store is empty: train one (xray-watcher train --store $DATA/model_store ...)"
fi

# --- units, rewritten where the folders are not the defaults
mkdir -p "$ROOT$UNIT_DIR"
for name in xray-watcher.service xray-watcher-listener.service; do
    [ -f "$HERE/systemd/$name" ] || continue
    # through placeholders, so that a new path holding a default one is not rewritten twice
    # (ReadWritePaths=/var/lib/xray-watcher and ReadOnlyPaths=/var/lib/xray-watcher/model_store
    # become DATA and DATA/model_store)
    sed -e "s|/opt/xray-watcher|@XW_PREFIX@|g" -e "s|/var/lib/xray-watcher|@XW_DATA@|g" \
        -e "s|/etc/xray-watcher|@XW_ETC@|g" -e "s|@XW_PREFIX@|$PREFIX|g" -e "s|@XW_DATA@|$DATA|g" \
        -e "s|@XW_ETC@|$ETC|g" "$HERE/systemd/$name" >"$ROOT$UNIT_DIR/$name.tmp"
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
else
    say "systemd is not running here (or a fake root): no daemon-reload"
fi

# --- does the installed version take the config (kept on an upgrade) and load the model?
if [ -z "$(ls -A "$ROOT$DATA/model_store")" ]; then
    say "check skipped: no model yet"
elif [ ! -x "$XW" ]; then
    say "check skipped: no $XW (VENV=skip)"
else
    checked_config=$ETC/config.yaml
    if [ -n "$ROOT" ]; then # a copy whose DATA paths point into the fake root
        checked_config=$work/config.yaml
        re_data=$(printf '%s\n' "$DATA" | sed 's/[][\\.*^$]/\\&/g')
        to_root=$(printf '%s\n' "$ROOT$DATA" | sed 's/[|&\\]/\\&/g')
        sed "s|$re_data|$to_root|g" "$config" >"$checked_config"
    fi
    as_user=""
    if [ -z "$ROOT" ] && command -v runuser >/dev/null 2>&1; then as_user="runuser -u $USER_NAME --"; fi
    if (
        cd /
        export TF_CPP_MIN_LOG_LEVEL=2 ORT_DISABLE_TELEMETRY=1 ORT_TELEMETRY_DISABLED=1 # as the unit sets them
        # shellcheck disable=SC2086  # as_user is a list of words
        exec $as_user "$XW" check --config "$checked_config"
    ) >"$work/check.out" 2>&1; then
        say "xray-watcher check --config $ETC/config.yaml: ok"
        sed 's/^/    /' "$work/check.out"
    else
        rc=$?
        sed 's/^/    /' "$work/check.out" >&2
        if [ "$rc" -eq 2 ]; then
            why="this version refuses config.yaml, so a (re)start of the service would stop with exit 2. Fix config.yaml (this version's template: $ETC/config.yaml.dist)"
        else
            why="the model store's current version does not load with this version (see above), so a (re)started service would serve the version promoted before it, if that one loads, and report DEGRADED. Fix or roll back the model (xray-watcher models ...)"
        fi
        printf 'install-service: error: %s\n' "xray-watcher ${version:+$version }is installed, but 'xray-watcher check --config $ETC/config.yaml' fails (exit $rc): $why, and run the check again before restarting" >&2
        exit 3
    fi
fi
if [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then
    say "next: systemctl enable --now xray-watcher (an upgrade: systemctl restart xray-watcher) && xray-watcher status --config $ETC/config.yaml"
fi
