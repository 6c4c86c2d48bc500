# Shared by the guest build scripts (sourced; the caller defines say and die):
# Debian's packages installed when missing, and the static-binary check.
apt_updated=0
apt_update() {
  [ $apt_updated = 0 ] || return 0
  say "apt-get update"
  apt-get update -qq || die "apt-get update failed"
  apt_updated=1
}
apt_install() { # PACKAGE...
  [ "$(id -u)" = 0 ] || die "need root to install $* (apt-get install $*), or install them first"
  local p
  for p in "$@"; do
    apt-cache show "$p" >/dev/null 2>&1 || apt_update
  done
  say "installing $* from Debian's packages"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null ||
    die "apt-get install $* failed"
}
is_static() { # FILE: an ELF without an interpreter
  [ -x "$1" ] && ! LC_ALL=C readelf -l "$1" 2>/dev/null | grep -q 'Requesting program interpreter'
}
