#!/usr/bin/env bash
# Build containerd's snapshotter conformance suite (suite_test.go beside this script) into a
# test binary, offline, from Debian 12's packages: golang-go must be installed; the Go
# sources come from Debian's -dev packages, downloaded (apt-get download) and unpacked
# (dpkg-deb -x) into WORK rather than installed, since installing them pulls ~110 packages.
#
#   tests/containerd/build-suite.sh OUTPUT [WORK]
#
# WORK (default: a temporary directory, removed afterwards) keeps the packages, the
# unpacked sources and Go's build cache; a second build with the same WORK is quick.
set -euo pipefail
out=$(realpath -m "$1")
here=$(cd "$(dirname "$0")" && pwd)
if [ $# -ge 2 ]; then
  work=$(realpath -m "$2")
  mkdir -p "$work"
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
fi
command -v go >/dev/null || { echo "build-suite: go is not installed (apt-get install golang-go)" >&2; exit 1; }

packages=(
  golang-github-containerd-containerd-dev golang-github-containerd-continuity-dev
  golang-github-containerd-ttrpc-dev golang-github-gogo-protobuf-dev
  golang-github-golang-protobuf-1-3-dev golang-github-google-go-cmp-dev
  golang-github-gotestyourself-gotest.tools-dev golang-github-moby-sys-dev
  golang-github-opencontainers-go-digest-dev golang-github-pkg-errors-dev
  golang-github-sirupsen-logrus-dev golang-golang-x-net-dev golang-golang-x-sys-dev
  golang-golang-x-text-dev golang-google-genproto-dev golang-google-grpc-dev
  golang-google-protobuf-dev golang-github-coreos-bbolt-dev golang-golang-x-sync-dev
)
mkdir -p "$work/debs" "$work/root"
if [ ! -f "$work/root/.unpacked" ]; then
  # apt's _apt user must be able to write where it downloads
  chmod 0777 "$work/debs"
  (cd "$work/debs" && apt-get download -qq "${packages[@]}" 2>&1 | grep -v "^W: Download is performed unsandboxed" || true)
  for p in "${packages[@]}"; do
    deb=$(ls "$work/debs/${p}"_*.deb 2>/dev/null | head -1)
    [ -n "$deb" ] || { echo "build-suite: could not download $p (run apt-get update first)" >&2; exit 1; }
    dpkg-deb -x "$deb" "$work/root"
  done
  touch "$work/root/.unpacked"
fi

mkdir -p "$work/gopath/src/thinpoolsuite"
cp "$here/suite_test.go" "$work/gopath/src/thinpoolsuite/suite_test.go"
cd "$work/gopath/src/thinpoolsuite"
GO111MODULE=off GOPROXY=off GOFLAGS= GOCACHE="$work/gocache" \
  GOPATH="$work/root/usr/share/gocode:$work/gopath" \
  go test -c -o "$out" .
echo "build-suite: built $out"
