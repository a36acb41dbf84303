#!/usr/bin/env bash
# Prepares the catalog benchmark on a running service: a customer, and its
# token with the scope apps:read, printed.
#
#   BASE_URL=http://127.0.0.1:8000 loadtest/bench/catalog-setup.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

. loadtest/bench/lib.sh
customer=$(new_enterprise_customer)
$bin token --sub "$customer" --scope "apps:read"
