#!/usr/bin/env bash
# System packages llmq needs: redis-server (the broker, and what the tests
# start on a free port), chromium (the headless browser that the web page
# tests drive through Playwright, at /usr/bin/chromium), and cmake and g++
# (scripts/install-llamacpp.sh builds llama.cpp's server with them). Installed with apt on
# Debian/Ubuntu when missing; elsewhere, say what to install and stop (not for
# chromium alone: without it the web page tests skip).
set -euo pipefail
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v g++ >/dev/null 2>&1 || need+=(g++)
[ ${#need[@]} -eq 0 ] && exit 0
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
  # Debian starts the packaged service on 6379; llmq starts its own.
  if command -v systemctl >/dev/null 2>&1; then $SUDO systemctl disable --now redis-server >/dev/null 2>&1 || true; fi
else
  echo "llmq needs: ${need[*]} (macOS: brew install redis; without chromium the web page tests skip)" >&2
  [ "${need[*]}" = "chromium" ] && exit 0
  exit 1
fi
