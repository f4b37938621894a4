//! The start of a connection to a TLS port: telling a TLS client from a
//! plaintext one, and the handshake, before the connection is served.
//!
//! A plaintext client would otherwise read a TLS alert as a frame header and
//! fail with nonsense (or wait). The first byte tells them apart: a TLS
//! client's first record is a handshake (0x16), a queueber frame starts with
//! its segment count minus one. So a plaintext client is answered in its own
//! protocol, a typed error about the connection (id 0) that says to use TLS,
//! and closed.
//!
//! Looking at the first byte and the handshake are each bounded by the stall
//! timeout, and a connection counts against `--max-connections` from the
//! moment it is accepted: clients that connect and send nothing, or start a
//! handshake and never finish it, hold neither a slot nor memory for long.

use std::rc::Rc;
use std::time::Duration;

use glommio::net::TcpStream;

use super::connection::{self, ConnectionGuard, ShardContext, LINGER};
use crate::metrics::TlsRefusal;
use crate::protocol::{ErrorCode, ErrorReply};
use crate::runtime::within;
use crate::tls::{ServerTls, TLS_HANDSHAKE_RECORD};

/// What a plaintext client on the TLS port is told.
pub(crate) const PLAINTEXT_ON_TLS_PORT: &str =
    "this port speaks TLS: connect with TLS (the CLI's --tls, the client's ClientTls)";

/// Serves a connection accepted on a TLS port once its handshake is done;
/// `admitted` is the connection's slot, or why there is none (it is then
/// told so over TLS, and closed).
pub(crate) async fn serve_tls(
    stream: TcpStream,
    tls: ServerTls,
    ctx: Rc<ShardContext>,
    admitted: Result<ConnectionGuard, String>,
) {
    let peer = stream.peer_addr().ok().map(|a| a.ip());
    let stall = Duration::from_millis(ctx.limits.stall_timeout_ms);
    let refused = |why: TlsRefusal| ctx.metrics.record_tls_refusal(why);
    let mut first = [0u8; 1];
    match within(stall, stream.peek(&mut first)).await {
        Some(Ok(1)) if first[0] == TLS_HANDSHAKE_RECORD => {}
        Some(Ok(1)) => {
            refused(TlsRefusal::Plaintext);
            tracing::debug!(?peer, "a plaintext client on the TLS port");
            let error = ErrorReply::new(ErrorCode::InvalidArgument, PLAINTEXT_ON_TLS_PORT);
            connection::refuse_with(stream, error, LINGER).await;
            return;
        }
        // EOF or a socket error: nothing to tell anyone.
        Some(_) => return,
        None => {
            refused(TlsRefusal::Timeout);
            return;
        }
    }
    let stream = match within(stall, tls.accept(stream)).await {
        Some(Ok(stream)) => stream,
        Some(Err(error)) => {
            // At debug: anyone can make handshakes fail, and the count is
            // in the metrics (queueber_tls_refused_connections_total).
            refused(TlsRefusal::Handshake);
            tracing::debug!(?peer, %error, "TLS handshake failed");
            return;
        }
        None => {
            refused(TlsRefusal::Timeout);
            return;
        }
    };
    match admitted {
        // TLS session state stays with this shard: the connection never moves.
        Ok(guard) => connection::serve(stream, ctx, connection::Arrival::accepted(peer, guard), None).await,
        Err(why) => connection::refuse(stream, &why, LINGER).await,
    }
}
