#!/bin/sh
# The producer credential on RabbitMQ: publish events, nothing else (deploy/broker/README.md).
#   FLEET_PRODUCER_USER=producer FLEET_PRODUCER_PASSWORD=... [FLEET_VHOST=/] deploy/broker/rabbitmq-producer.sh
# configure: declare the task-sent events' exchange; write: publish to the `events`
# exchange and to `celeryev`; read: nothing (no binding, no consuming, no purging).
set -eu
: "${FLEET_PRODUCER_USER:?set FLEET_PRODUCER_USER}" "${FLEET_PRODUCER_PASSWORD:?set FLEET_PRODUCER_PASSWORD}"
vhost="${FLEET_VHOST:-/}"
rabbitmqctl add_user "$FLEET_PRODUCER_USER" "$FLEET_PRODUCER_PASSWORD"
rabbitmqctl set_permissions -p "$vhost" "$FLEET_PRODUCER_USER" '^celeryev$' '^(events|celeryev)$' '^$'
