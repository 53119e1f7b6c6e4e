#!/bin/sh
# Hash the UI credentials from the environment into htpasswd files (bcrypt), then run nginx.
# The passwords never reach a file in clear, the image or the webservers.
set -eu
: "${FLUX_UI_ADMIN_USER:=admin}" "${FLUX_UI_VIEWER_USER:=viewer}"
if [ -z "${FLUX_UI_ADMIN_PASSWORD:-}" ]; then
    echo "proxy: FLUX_UI_ADMIN_PASSWORD is empty; refusing to serve the UI without authentication" >&2
    exit 1
fi
mkdir -p /run/proxy
umask 027
rm -f /run/proxy/admin.htpasswd /run/proxy/viewer.htpasswd
printf '%s' "$FLUX_UI_ADMIN_PASSWORD" | htpasswd -iBc /run/proxy/admin.htpasswd "$FLUX_UI_ADMIN_USER" 2>/dev/null
cp /run/proxy/admin.htpasswd /run/proxy/viewer.htpasswd
if [ -n "${FLUX_UI_VIEWER_PASSWORD:-}" ]; then
    printf '%s' "$FLUX_UI_VIEWER_PASSWORD" | htpasswd -iB /run/proxy/viewer.htpasswd "$FLUX_UI_VIEWER_USER" 2>/dev/null
fi
chgrp www-data /run/proxy/admin.htpasswd /run/proxy/viewer.htpasswd
exec nginx -g "daemon off;"
