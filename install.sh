#!/bin/sh
# Install thrum for the current user.
#
#   sh install.sh                  copy thrum.py to ${XDG_DATA_HOME:-~/.local/share}/thrum/ and
#                                  write a `thrum` launcher to ${PREFIX:-~/.local/bin}
#   sh install.sh --prefix DIR     put the launcher in DIR instead
#   sh install.sh --pip            pip install this checkout (--user unless a venv is active)
#
# Run it from a checkout: it installs the thrum.py that sits next to it. No network is needed
# for the default mode, and nothing outside your home directory (or DIR) is touched.
set -eu

prog=install.sh
say() { printf '%s\n' "$*"; }
warn() { printf '%s: warning: %s\n' "$prog" "$*" >&2; }
die() { printf '%s: error: %s\n' "$prog" "$*" >&2; exit "${2:-1}"; }

usage() {
    cat <<'EOF'
usage: install.sh [--prefix DIR] [--pip] [--help]

Install thrum (git-backed messaging for AI agents) for the current user.

  (default)      copy thrum.py to ${XDG_DATA_HOME:-$HOME/.local/share}/thrum/thrum.py,
                 precompile it, and write an executable `thrum` launcher into the bin dir
  --prefix DIR   bin dir for the launcher (default: ${PREFIX:-$HOME/.local/bin})
  --pip          instead run `python3 -m pip install --user .` (without --user when a
                 virtualenv is active); this also installs the `thrum` console script
  -h, --help     show this help

Environment: PYTHON (interpreter to use, default python3), PREFIX, XDG_DATA_HOME.
EOF
}

mode=file
prefix=${PREFIX:-}
while [ $# -gt 0 ]; do
    case $1 in
        -h|--help) usage; exit 0 ;;
        --pip) mode=pip ;;
        --prefix)
            [ $# -ge 2 ] || die "--prefix needs a directory" 2
            prefix=$2; shift ;;
        --prefix=*) prefix=${1#--prefix=} ;;
        *) usage >&2; die "unknown option: $1" 2 ;;
    esac
    shift
done

[ -n "${HOME:-}" ] || die "HOME is not set"
[ -n "$prefix" ] || prefix=$HOME/.local/bin

here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd -P)
src=$here/thrum.py
[ -f "$src" ] || die "thrum.py not found next to install.sh (looked in $here)"

py=${PYTHON:-python3}
command -v "$py" >/dev/null 2>&1 || die "$py not found; thrum needs Python 3.11 or newer"
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "thrum needs Python 3.11 or newer; $py is $("$py" -c 'import sys; print(sys.version.split()[0])')"

if [ "$mode" = pip ]; then
    if [ -n "${VIRTUAL_ENV:-}" ]; then
        say "Installing thrum into the active virtualenv $VIRTUAL_ENV with pip ..."
        "$py" -m pip install "$here"
        where=$VIRTUAL_ENV/bin
    else
        say "Installing thrum for $(id -un 2>/dev/null || echo you) with pip --user ..."
        "$py" -m pip install --user "$here"
        where=$("$py" -c 'import os, site, sysconfig; print(sysconfig.get_path("scripts", os.name + "_user"))' 2>/dev/null || echo "$HOME/.local/bin")
    fi
    say "Installed the thrum console script in $where"
    bindir=$where
else
    datadir=${XDG_DATA_HOME:-$HOME/.local/share}/thrum
    mkdir -p "$datadir" "$prefix"
    bindir=$(CDPATH= cd -- "$prefix" && pwd -P)
    # copy, then rename: a running thrum never sees a half-written file
    cp "$src" "$datadir/thrum.py.tmp.$$"
    mv -f "$datadir/thrum.py.tmp.$$" "$datadir/thrum.py"
    # the launcher imports the module, so its bytecode is cached in __pycache__
    "$py" - "$datadir" "$bindir/thrum" <<'EOF'
import os, sys
datadir, launcher = sys.argv[1], sys.argv[2]
interp = "/usr/bin/env python3" if not os.environ.get("PYTHON") else sys.executable
text = (
    f"#!{interp}\n"
    "# thrum launcher written by install.sh; the program is the single file below.\n"
    "import sys\n"
    f"sys.path.insert(0, {datadir!r})\n"
    "import thrum\n"
    "raise SystemExit(thrum.main())\n"
)
tmp = f"{launcher}.tmp.{os.getpid()}"
with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
os.chmod(tmp, 0o755)
os.replace(tmp, launcher)
EOF
    "$py" -c 'import py_compile, sys; py_compile.compile(sys.argv[1], doraise=True)' "$datadir/thrum.py"
    version=$("$bindir/thrum" --version 2>/dev/null || true)
    say "Installed thrum${version:+ ($version)}"
    say "  program:  $datadir/thrum.py"
    say "  launcher: $bindir/thrum"
fi

case ":${PATH:-}:" in
    *":$bindir:"*) say "Run: thrum --help" ;;
    *) warn "$bindir is not on your PATH; add it, e.g.:"
       warn "  export PATH=\"$bindir:\$PATH\"" ;;
esac
