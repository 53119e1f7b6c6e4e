"""queue payload and socket, notification outbox, estimated charges

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

- pending_executions.socket_id: stream the text generator's answer to that client (reference §2.1).
- pending_executions.payload: a row's own input (the delivery plan of kind ``delivery``).
- status_notifications.node_id/status/published_at: the outbox of statuses kept while Redis is
  unreachable and published, in order, once it is back (NULL published_at = not yet published).
- token_ledger.estimated: the provider reported no usage; the worker counted the tokens itself.
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

_json = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    with op.batch_alter_table('pending_executions') as batch:
        batch.add_column(sa.Column('socket_id', sa.String(length=255), nullable=True))
        batch.add_column(sa.Column('payload', _json, nullable=True))
    with op.batch_alter_table('status_notifications') as batch:
        batch.add_column(sa.Column('node_id', sa.String(length=255), nullable=True))
        batch.add_column(sa.Column('status', sa.String(length=16), nullable=True))
        batch.add_column(sa.Column('published_at', sa.DateTime(timezone=True), nullable=True))
    op.create_index('ix_status_notifications_unpublished', 'status_notifications', ['published_at', 'id'])
    with op.batch_alter_table('token_ledger') as batch:
        batch.add_column(sa.Column('estimated', sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table('token_ledger') as batch:
        batch.drop_column('estimated')
    op.drop_index('ix_status_notifications_unpublished', table_name='status_notifications')
    with op.batch_alter_table('status_notifications') as batch:
        batch.drop_column('published_at')
        batch.drop_column('status')
        batch.drop_column('node_id')
    with op.batch_alter_table('pending_executions') as batch:
        batch.drop_column('payload')
        batch.drop_column('socket_id')
