"""Django + idempo, as one file: ``python examples/django_app.py runserver``

    curl -i -X POST localhost:8000/payments -H 'Idempotency-Key: 8e03978e-40d5-43e8-bc93-6894a57f9324' \
         -H 'Content-Type: application/json' -d '{"amount": 1999}'

Send it twice: the second answer is the first one, replayed (``Idempotent-Replayed: true``).
In a project, the two settings below go in settings.py and the views in views.py.
"""

import itertools
import json
import os
import sys

from django.conf import settings

settings.configure(
    DEBUG=True,
    SECRET_KEY="example-only",
    ALLOWED_HOSTS=["localhost", "127.0.0.1"],
    ROOT_URLCONF=__name__,
    MIDDLEWARE=[
        "django.middleware.common.CommonMiddleware",
        "idempo.django.IdempotencyMiddleware",
    ],
    IDEMPO={"STORE": os.environ.get("IDEMPO_STORE", "sqlite:///idempo-django.db"), "POLICY": {"record_ttl": 86400}},
)

from django.http import HttpRequest, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402

from idempo.django import idempotency_exempt, idempotency_required  # noqa: E402

ids = itertools.count(1)


@idempotency_required(record_ttl=3600)
def pay(request: HttpRequest) -> JsonResponse:
    payment = json.loads(request.body)
    return JsonResponse({"payment_id": next(ids), "amount": payment["amount"]}, status=201)


@idempotency_exempt
def webhook(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"received": True})


urlpatterns = [path("payments", pay), path("webhooks", webhook)]

if __name__ == "__main__":
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
