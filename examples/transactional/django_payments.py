"""Django + SQLite, transactional: ``python examples/transactional/django_payments.py runserver``

The view runs inside ``transaction.atomic()`` on the ``default`` database, whose file also holds
idempo's records (``PAYMENTS_DB``, default ``payments.db``): the payment row and the record's
completion commit together, through Django's own connection. In a project, the settings go in
settings.py and the view in views.py.
"""

import json
import os
import sys

import django
from django.conf import settings

DB = os.environ.get("PAYMENTS_DB", "payments.db")
settings.configure(
    SECRET_KEY="example-only",
    ALLOWED_HOSTS=["localhost", "127.0.0.1"],
    ROOT_URLCONF=__name__,
    MIDDLEWARE=["idempo.django.IdempotencyMiddleware"],
    DATABASES={
        # BEGIN IMMEDIATE: the atomic block takes SQLite's write lock at once (Django 5.1+).
        "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": DB, "OPTIONS": {"transaction_mode": "IMMEDIATE"}}
    },
    # The store is the same file: SQLite commits atomically one file at a time.
    IDEMPO={"STORE": f"sqlite:///{DB}", "DATABASE": "default"},
)
django.setup()

from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.db import connection  # noqa: E402
from django.http import HttpRequest, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402

from idempo.django import idempotency_required  # noqa: E402

with connection.cursor() as setup:
    setup.execute("CREATE TABLE IF NOT EXISTS payments (id INTEGER PRIMARY KEY, order_id TEXT, cents INTEGER)")


@idempotency_required(transactional=True)
def pay(request: HttpRequest) -> JsonResponse:
    payment = json.loads(request.body)
    with connection.cursor() as cursor:  # or the ORM: every write on "default" joins the atomic block
        cursor.execute(
            "INSERT INTO payments (order_id, cents) VALUES (%s, %s)", [payment["order_id"], payment["cents"]]
        )
        payment_id = cursor.lastrowid
    return JsonResponse({"id": payment_id, "order_id": payment["order_id"]}, status=201)


urlpatterns = [path("payments", pay)]
application = get_wsgi_application()

if __name__ == "__main__":
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
