# Helpers shared by the launch scripts: usage errors, flag values, and `run`, which prints
# each command before running it and only prints it under --dry-run / DRY_RUN=1.
# shellcheck shell=bash

DRY_RUN=${DRY_RUN:-0}
PROG=${PROG:-$0}

# Usage errors (a missing flag, a bad value): to stderr, exit status 2.
die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  printf "run '%s --help' for usage\n" "$PROG" >&2
  exit 2
}

# Failures of the work itself (not of the command line): exit status 1.
fail() {
  printf '%s: %s\n' "$PROG" "$*" >&2
  exit 1
}

# The value following flag $1 (call as `X=$(value "$@")`; a missing value is a usage error).
value() {
  [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$1 needs a value"
  printf '%s\n' "$2"
}

# One word as a shell would need it, so that a printed command can be pasted back.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Prints "+ command" (stdout under dry-run, where it is the output; stderr otherwise, like
# `set -x`, so that real output stays clean).
show() {
  local line="+" word
  for word in "$@"; do line+=" $(quote "$word")"; done
  if [[ $DRY_RUN == 1 ]]; then printf '%s\n' "$line"; else printf '%s\n' "$line" >&2; fi
}

run() {
  show "$@"
  [[ $DRY_RUN == 1 ]] || "$@"
}

# Exports NAME=VALUE in this shell (also under dry-run: later commands may read it) and shows it.
setenv() {
  show export "$1=$2"
  export "$1=$2"
}
