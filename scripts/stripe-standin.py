#!/usr/bin/env python3
"""A stateful stand-in for Stripe's REST API, for scripts/check-contract.sh.

While schemathesis fuzzes the service, its billing routes need a Stripe that
answers as Stripe does and with whole objects: the service's client
(async-stripe) deserialises them strictly. Answers are Stripe's published
fixtures, read from tests/api/stripe/*.json, with the fields that matter set;
state lives in memory for the life of the process.

It mirrors tests/api/stripe_standin.rs, the test suite's stand-in (keep the
two in step): the same routes, test cards, subscription updates, invoice
payments and idempotency keys. It also answers the two calls the service makes
that the Rust stand-in leaves to per-test mocks: POST /v1/setup_intents and
POST /v1/payment_intents (a token purchase).

    python3 scripts/stripe-standin.py [--port 12111] [--verbose]
    STRIPE_API_BASE=http://127.0.0.1:12111/ connected-apps serve
"""

import argparse
import copy
import json
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "api" / "stripe"
# Read at start: a missing fixture stops the script, not a request mid-run.
TEXTS = {name: (FIXTURES / f"{name}.json").read_text() for name in
         ("customer", "subscription", "setup_intent", "payment_intent", "payment_method")}

# Stripe's test cards that do not pay, as the Rust charge(); any other pays.
DECLINES = {
    "pm_card_chargeDeclined": ("card_declined", "Your card was declined."),
    "pm_card_authenticationRequired": ("authentication_required",
                                       "This payment requires authentication."),
}


def fixture(name):
    """A fresh copy of one of Stripe's fixtures."""
    return json.loads(TEXTS[name])


def error(status, message, kind="invalid_request_error"):
    return status, {"error": {"type": kind, "message": message}}


def card_error(code, message):
    return 402, {"error": {"type": "card_error", "code": code,
                           "decline_code": "generic_decline", "message": message}}


class World:
    """What Stripe holds. One lock serialises requests, as the Rust Mutex does."""

    def __init__(self):
        self.lock = threading.Lock()
        self.next = 0
        self.customers = []
        self.default_card = {}      # Stripe customer id -> its default card
        self.subscriptions = {}
        self.payment_intents = {}
        self.invoice_payments = {}  # invoice id -> its payment intent id
        self.keys = {}              # idempotency key -> (body, status, reply bytes)

    def new_id(self, prefix):
        self.next += 1
        return f"{prefix}_standin{self.next}"


# Customers, cards, setup intents

def search_customers(world, query):
    # query is metadata['customer_id']:'<id>': the id is the fourth piece.
    pieces = query.split("'")
    wanted = pieces[3] if len(pieces) > 3 else ""
    data = [c for c in world.customers if c["metadata"].get("customer_id") == wanted]
    return 200, {"object": "search_result", "data": data, "has_more": False,
                 "next_page": None, "url": "/v1/customers/search"}


def create_customer(world, params):
    customer = fixture("customer")
    customer["id"] = world.new_id("cus")
    customer["email"] = params.get("email")
    customer["metadata"] = {"customer_id": params.get("metadata[customer_id]")}
    world.customers.append(customer)
    return 200, customer


def update_customer(world, stripe_id, params):
    # The default card is the one update_subscription charges.
    if "invoice_settings[default_payment_method]" in params:
        world.default_card[stripe_id] = params["invoice_settings[default_payment_method]"]
    hits = [c for c in world.customers if c["id"] == stripe_id]
    return (200, hits[0]) if hits else error(404, "No such customer")


def attach_payment_method(card, params):
    # Any card attaches, a declining one too: Stripe declines at the charge.
    pm = fixture("payment_method")
    pm["id"] = card
    pm["customer"] = params.get("customer")
    return 200, pm


def create_setup_intent(world, params):
    # Not in the Rust stand-in: an intent waiting for Stripe.js to collect
    # a card, with the client secret the dashboard needs.
    intent = fixture("setup_intent")
    intent["id"] = world.new_id("seti")
    intent.update(client_secret=f"{intent['id']}_secret_1", customer=params.get("customer"),
                  created=int(time.time()), last_setup_error=None, next_action=None)
    return 200, intent


# Subscriptions

def subscription(sub_id, stripe_customer, price, ours):
    """Active on `price`, in a month-long period that began now."""
    now = int(time.time())
    sub = fixture("subscription")
    sub.update(id=sub_id, status="active", customer=stripe_customer,
               metadata={"customer_id": ours}, pending_update=None,
               latest_invoice=None, cancel_at_period_end=False, created=now)
    item = sub["items"]["data"][0]
    item["price"]["id"] = price
    item["current_period_start"] = now
    item["current_period_end"] = now + 30 * 86_400
    return sub


def create_subscription(world, params):
    failure = DECLINES.get(params.get("default_payment_method", ""))
    if failure:
        # error_if_incomplete: the first invoice is declined, nothing is made.
        return card_error(*failure)
    sub_id = world.new_id("sub")
    world.subscriptions[sub_id] = subscription(
        sub_id, params.get("customer", ""), params.get("items[0][price]", ""),
        params.get("metadata[customer_id]", ""))
    return 200, world.subscriptions[sub_id]


def update_subscription(world, sub_id, params):
    """A price change: invoiced at once with always_invoice, charged to the
    customer's default card; unpaid, kept pending or applied anyway as
    payment_behavior says. A cancellation at the period's end."""
    if sub_id not in world.subscriptions:
        return error(404, "No such subscription")
    if world.subscriptions[sub_id]["status"] == "canceled":
        return error(400, "A canceled subscription can only update its cancellation_details "
                     "and metadata.")
    sub = copy.deepcopy(world.subscriptions[sub_id])
    if "cancel_at_period_end" in params:
        sub["cancel_at_period_end"] = params["cancel_at_period_end"] == "true"
    price = params.get("items[0][price]")
    if price is not None:
        invoiced = params.get("proration_behavior") == "always_invoice"
        customer = sub["customer"] or ""
        card = world.default_card.get(customer, "")
        failure = DECLINES.get(card)
        paid = not invoiced or failure is None
        if invoiced:
            invoice = world.new_id("in")
            status = ("succeeded" if paid else "requires_action"
                      if card == "pm_card_authenticationRequired" else "requires_payment_method")
            last_error = failure and {"type": "card_error", "code": failure[0],
                                      "message": failure[1]}
            intent = payment_intent(world, customer, status, last_error)
            world.invoice_payments[invoice] = intent["id"]
            sub["latest_invoice"] = invoice
        item = sub["items"]["data"][0]
        if paid:
            item["price"]["id"] = price
            sub.update(status="active", pending_update=None)
        elif params.get("payment_behavior", "allow_incomplete") == "pending_if_incomplete":
            # The old price stays; Stripe keeps the change for 23 hours.
            pending_item = copy.deepcopy(item)
            pending_item["price"]["id"] = price
            sub["pending_update"] = {
                "billing_cycle_anchor": None, "expires_at": int(time.time()) + 23 * 3600,
                "subscription_items": [pending_item], "trial_end": None, "trial_from_plan": None,
                "discounts": None, "metadata": None, "cancel_at_period_end": None}
        else:  # allow_incomplete: applied, and the subscription falls past due
            item["price"]["id"] = price
            sub["status"] = "past_due"
    world.subscriptions[sub_id] = sub
    return 200, sub


def list_subscriptions(world, query):
    # Stripe's list: newest first; canceled ones only when asked.
    status = query.get("status")
    data = [s for s in world.subscriptions.values()
            if ("customer" not in query or s["customer"] == query["customer"])
            and (status == "all" or (s["status"] == status if status else s["status"] != "canceled"))]
    data.sort(key=lambda s: int(s["id"].rsplit("standin", 1)[-1]), reverse=True)
    return 200, {"object": "list", "data": data, "has_more": False, "url": "/v1/subscriptions"}


def cancel_subscription(world, sub_id):
    sub = world.subscriptions.get(sub_id)
    if sub is None:
        return error(404, "No such subscription")
    sub["status"] = "canceled"
    return 200, sub


# Payments

def payment_intent(world, customer, status, last_error):
    """A payment intent, kept for GET /v1/payment_intents/{id}."""
    pi = fixture("payment_intent")
    pi["id"] = world.new_id("pi")
    pi.update(customer=customer, client_secret=f"{pi['id']}_secret_1", status=status,
              last_payment_error=last_error)
    world.payment_intents[pi["id"]] = pi
    return pi


def create_payment_intent(world, params):
    # Not in the Rust stand-in: a token purchase, confirmed at once with the
    # card. A decline is Stripe's 402 (the service records nothing); a card
    # that needs 3-D Secure leaves the intent waiting for the customer, as
    # an on-session payment does.
    amount = params.get("amount", "")
    if not amount.isdigit():
        return error(400, "Invalid integer: amount")
    card = params.get("payment_method")
    failure = DECLINES.get(card or "")
    if failure and failure[0] != "authentication_required":
        return card_error(*failure)
    status = ("requires_confirmation" if params.get("confirm") != "true"
              else "requires_action" if failure else "succeeded")
    pi = payment_intent(world, params.get("customer"), status, None)
    pi.update(amount=int(amount), amount_received=int(amount) if status == "succeeded" else 0,
              currency=params.get("currency", "usd"), payment_method=card,
              description=params.get("description"), created=int(time.time()),
              canceled_at=None, processing=None,
              metadata={k[len("metadata["):-1]: v for k, v in params.items()
                        if k.startswith("metadata[") and k.endswith("]")},
              next_action={"type": "use_stripe_sdk", "use_stripe_sdk": {}}
              if status == "requires_action" else None)
    return 200, pi


def list_invoice_payments(world, invoice):
    intent = world.invoice_payments.get(invoice)
    data = [] if intent is None else [{
        "object": "invoice_payment", "id": f"inpay_{invoice}", "amount_paid": None,
        "amount_requested": 17100, "created": int(time.time()), "currency": "usd",
        "invoice": invoice, "is_default": True, "livemode": False,
        "payment": {"type": "payment_intent", "payment_intent": intent},
        "status": "open", "status_transitions": {"canceled_at": None, "paid_at": None}}]
    return 200, {"object": "list", "data": data, "has_more": False, "url": "/v1/invoice_payments"}


def found(obj, what):
    return (200, obj) if obj is not None else error(404, f"No such {what}")


def route(world, method, path, query, params):
    """(status, reply) for one request, as the Rust stand-in's route()."""
    rest = path
    while rest.startswith("/v1/"):  # Rust's trim_start_matches("/v1/")
        rest = rest[len("/v1/"):]
    match method, rest.split("/"):
        case "GET", ["customers", "search"]:
            return search_customers(world, query.get("query", ""))
        case "POST", ["customers"]:
            return create_customer(world, params)
        case "POST", ["customers", stripe_id]:
            return update_customer(world, stripe_id, params)
        case "POST", ["payment_methods", card, "attach"]:
            return attach_payment_method(card, params)
        case "POST", ["setup_intents"]:
            return create_setup_intent(world, params)
        case "POST", ["subscriptions"]:
            return create_subscription(world, params)
        case "GET", ["subscriptions"]:
            return list_subscriptions(world, query)
        case "GET", ["subscriptions", sub_id]:
            return found(world.subscriptions.get(sub_id), "subscription")
        case "DELETE", ["subscriptions", sub_id]:
            return cancel_subscription(world, sub_id)
        case "POST", ["subscriptions", sub_id]:
            return update_subscription(world, sub_id, params)
        case "GET", ["invoice_payments"]:
            return list_invoice_payments(world, query.get("invoice", ""))
        case "POST", ["payment_intents"]:
            return create_payment_intent(world, params)
        case "GET", ["payment_intents", pi_id]:
            return found(world.payment_intents.get(pi_id), "payment_intent")
    return error(404, f"the stand-in does not know {method} {path}")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    world = World()
    verbose = False

    def answer(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode(
            "utf-8", "replace")
        url = urlsplit(self.path)
        # Bracketed keys (metadata[customer_id], items[0][price]) stay flat
        # strings and a repeated key's last value wins, as in the Rust form().
        params = dict(parse_qsl(body, keep_blank_values=True))
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        key = self.headers.get("Idempotency-Key")
        with self.world.lock:
            saved = self.world.keys.get(key) if key else None
            if saved is None:
                status, reply = route(self.world, self.command, url.path, query, params)
                # Serialised under the lock, so later changes to the world
                # change neither this reply nor the one saved for the key.
                data = json.dumps(reply).encode()
                if key:
                    self.world.keys[key] = (body, status, data)
            elif saved[0] == body:  # the same key and parameters: the saved reply
                _, status, data = saved
            else:
                status, reply = error(400, "Keys for idempotent requests can only be used "
                                      "with the same parameters they were first used with.",
                                      kind="idempotency_error")
                data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    # Any method reaches route(), which answers what it does not know with a
    # 404 in Stripe's shape rather than http.server's 501 page.
    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = answer

    def log_message(self, fmt, *args):
        if self.verbose:
            sys.stderr.write(f"stripe-standin: {fmt % args}\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=12111)
    parser.add_argument("--verbose", action="store_true", help="log each request to stderr")
    args = parser.parse_args()
    Handler.verbose = args.verbose
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    # Set both explicitly: a shell starts background jobs with SIGINT
    # ignored, and SIGTERM would otherwise end the process without cleanup.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
