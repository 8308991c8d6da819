//! The proxy alone in front of one running PostgreSQL, to measure the relay's overhead.
//!
//!     cargo run --release -p stemma-proxy --example relay -- PORT SOCKET
//!
//! Listens on 127.0.0.1:PORT and relays every connection to the Unix socket SOCKET (a path
//! such as `/tmp/pg/.s.PGSQL.5432`) exactly as the daemon relays a branch's connections, with
//! no control plane: compare `pgbench` through PORT with `pgbench` on the socket directly.
use std::path::PathBuf;
use std::sync::Arc;

use stemma_proxy::{Backend, BoxFuture, Proxy, ProxyMetrics, Refusal, Route, Upstream};

struct Fixed(PathBuf);

impl Backend for Fixed {
    fn resolve(&self, _name: &str) -> Option<Route> {
        Some(route())
    }
    fn wake<'a>(&'a self, _route: &'a Route) -> BoxFuture<'a, Result<Upstream, Refusal>> {
        Box::pin(async move {
            Ok(Upstream {
                socket: self.0.clone(),
                tcp: None,
            })
        })
    }
}

fn route() -> Route {
    Route {
        key: "bench".into(),
        branch: "bench".into(),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [port, socket] = args.as_slice() else {
        eprintln!("usage: relay PORT SOCKET");
        std::process::exit(2);
    };
    let port: u16 = port.parse().expect("a port number");
    let proxy = Proxy::new(
        Arc::new(Fixed(PathBuf::from(socket))),
        ProxyMetrics::default(),
        None,
        None,
    );
    proxy.listen_branch(port, route()).await?;
    std::future::pending::<()>().await;
    Ok(())
}
