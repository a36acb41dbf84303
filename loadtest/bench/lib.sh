# shellcheck shell=bash
# Shared by the benchmark set-up scripts; sourced, not run, from the
# repository's root.

# The service under test, and the release binary that mints its tokens.
base=${BASE_URL:-http://127.0.0.1:8000}
bin=target/release/connected-apps

# Creates an enterprise customer (unlimited, so nothing runs out) through
# the operator API and prints its id.
new_enterprise_customer() {
  local admin
  admin=$($bin token --admin)
  curl -sf "$base/api/v1/admin/customers" -H "Authorization: Bearer $admin" \
    -H 'Content-Type: application/json' \
    -d "{\"name\":\"Bench Optics\",\"email\":\"bench-$RANDOM$RANDOM@example.com\",\"plan_id\":\"enterprise\"}" |
    sed -E 's/.*"id":"([^"]+)".*/\1/'
}
