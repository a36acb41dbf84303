# Sourced by the benchmark and chaos scripts: a customer with vto-001
# active, through the service's own API.
#
#   new_customer BINARY BASE_URL PLAN   prints "<customer id> <jwt>"
#
# BINARY mints the operator's and the customer's tokens (`token`), so the
# service at BASE_URL must share its JWT settings.
new_customer() {
  local bin=$1 base=$2 plan=$3 admin id token attempt
  admin=$("$bin" token --admin)
  # A refused create (a service still starting its roles) is tried again;
  # no customer after three tries fails the caller, rather than leaving it
  # a line without a token.
  for attempt in 1 2 3; do
    id=$(curl -fs "$base/api/v1/admin/customers" -H "Authorization: Bearer $admin" \
      -H 'Content-Type: application/json' \
      -d '{"name":"Bench Optics","email":"bench-'"$RANDOM$RANDOM$RANDOM"'@example.com","plan_id":"'"$plan"'"}' |
      grep -o '"id":"[^"]*"' | head -n 1 | cut -d'"' -f4) || true
    [ -n "$id" ] && break
    sleep "$attempt"
  done
  [ -n "$id" ] || { echo "new_customer: the service refused to create a customer three times" >&2; return 1; }
  token=$("$bin" token --sub "$id")
  curl -fs "$base/api/v1/customer/apps/vto-001/activate" -H "Authorization: Bearer $token" \
    -H 'Content-Type: application/json' -d '{"configuration":{"widget_placement":"product_page"}}' >/dev/null
  echo "$id $token"
}
