#!/usr/bin/env bash
# Installs the benchmark's tools from Debian's packages when they are missing:
# wrk (load), haproxy and nginx (the proxies compared, nginx also serves as the
# backends), with nginx's echo module (slow backends) and stream module (TCP),
# h2load (nghttp2-client: HTTP/2 and gRPC load) and valgrind (instructions per
# request, `make bench-instructions`).
set -euo pipefail
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v haproxy >/dev/null || need+=(haproxy)
command -v valgrind >/dev/null || need+=(valgrind)
command -v nginx >/dev/null || need+=(nginx-light)
[ -e /usr/lib/nginx/modules/ngx_http_echo_module.so ] || need+=(libnginx-mod-http-echo)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi
# The benchmark runs its own instances on its own loopback ports; services the
# packages may have started are left alone.
