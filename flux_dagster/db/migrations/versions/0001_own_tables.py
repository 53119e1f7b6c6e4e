"""own tables

Revision ID: 0001
Revises: 
Create Date: 2026-11-24
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('pending_executions',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('kind', sa.String(length=8), nullable=False),
    sa.Column('exec_id', sa.String(length=64), nullable=False),
    sa.Column('flow_id', sa.String(length=36), nullable=False),
    sa.Column('node_id', sa.String(length=255), nullable=True),
    sa.Column('user_id', sa.String(length=64), nullable=False),
    sa.Column('session_id', sa.String(length=255), nullable=True),
    sa.Column('flow_version_history_id', sa.String(length=64), nullable=True),
    sa.Column('run_id', sa.String(length=64), nullable=True),
    sa.Column('priority', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('cancel_requested_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('dagster_run_id', sa.String(length=64), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('launched_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('pending_executions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_pending_executions_exec_id'), ['exec_id'], unique=False)
        batch_op.create_index('ix_pending_executions_status_priority', ['status', 'priority', 'id'], unique=False)

    op.create_table('status_notifications',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('room', sa.String(length=255), nullable=False),
    sa.Column('exec_id', sa.String(length=64), nullable=True),
    sa.Column('payload', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('status_notifications', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_status_notifications_exec_id'), ['exec_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_status_notifications_room'), ['room'], unique=False)

    op.create_table('token_ledger',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('idempotency_key', sa.String(length=255), nullable=False),
    sa.Column('exec_id', sa.String(length=64), nullable=False),
    sa.Column('flow_id', sa.String(length=36), nullable=False),
    sa.Column('node_id', sa.String(length=255), nullable=True),
    sa.Column('user_id', sa.String(length=64), nullable=False),
    sa.Column('model', sa.String(length=128), nullable=False),
    sa.Column('ai_system', sa.String(length=64), nullable=False),
    sa.Column('input_tokens', sa.Integer(), nullable=False),
    sa.Column('output_tokens', sa.Integer(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('idempotency_key')
    )
    with op.batch_alter_table('token_ledger', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_token_ledger_exec_id'), ['exec_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('token_ledger', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_token_ledger_exec_id'))

    op.drop_table('token_ledger')
    with op.batch_alter_table('status_notifications', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_status_notifications_room'))
        batch_op.drop_index(batch_op.f('ix_status_notifications_exec_id'))

    op.drop_table('status_notifications')
    with op.batch_alter_table('pending_executions', schema=None) as batch_op:
        batch_op.drop_index('ix_pending_executions_status_priority')
        batch_op.drop_index(batch_op.f('ix_pending_executions_exec_id'))

    op.drop_table('pending_executions')
