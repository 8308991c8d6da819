//! `stemma bench`: measurements printed against a baseline taken in the same run.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use stemma_api::{Client, CreateBranchRequest};

/// Percentile `p` (0..=100) of sorted samples, nearest rank.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One connection through the proxy and the first query's result.
async fn connect_and_query(conn: &str) -> Result<Duration> {
    let t0 = Instant::now();
    let (client, connection) = tokio_postgres::connect(conn, tokio_postgres::NoTls)
        .await
        .context("connecting")?;
    let task = tokio::spawn(connection);
    client.simple_query("select 1").await.context("select 1")?;
    let elapsed = t0.elapsed();
    drop(client);
    let _ = task.await;
    Ok(elapsed)
}

pub fn cold_start(client: &Client, branch: &str, trials: usize, json: bool) -> Result<()> {
    let created = if client.get_branch(branch).is_err() {
        client.create_branch(&CreateBranchRequest {
            name: branch.to_string(),
            ..CreateBranchRequest::default()
        })?;
        true
    } else {
        false
    };
    let conn = client.get_branch(branch)?.connection_string;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let mut cold = Vec::with_capacity(trials);
    let mut warm = Vec::with_capacity(trials);
    for i in 0..trials {
        client.stop_compute(branch)?;
        cold.push(rt.block_on(connect_and_query(&conn))?);
        warm.push(rt.block_on(connect_and_query(&conn))?);
        if !json && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            eprint!("\rtrial {}/{trials}", i + 1);
        }
    }
    if !json && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprintln!();
    }
    if created {
        client.delete_branch(branch)?;
    }
    cold.sort();
    warm.sort();
    let row = |v: &[Duration]| {
        serde_json::json!({
            "p50_ms": ms(percentile(v, 50.0)),
            "p90_ms": ms(percentile(v, 90.0)),
            "p99_ms": ms(percentile(v, 99.0)),
            "max_ms": ms(*v.last().unwrap_or(&Duration::ZERO)),
        })
    };
    let ratio = ms(percentile(&cold, 50.0)) / ms(percentile(&warm, 50.0)).max(0.001);
    if json {
        let out = serde_json::json!({
            "trials": trials, "cold": row(&cold), "warm": row(&warm), "cold_over_warm_p50": ratio,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("connect + first result through the proxy, {trials} trials");
    println!(
        "{:<6} {:>9} {:>9} {:>9} {:>9}",
        "", "p50", "p90", "p99", "max"
    );
    for (name, v) in [("cold", &cold), ("warm", &warm)] {
        println!(
            "{name:<6} {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>7.1}ms",
            ms(percentile(v, 50.0)),
            ms(percentile(v, 90.0)),
            ms(percentile(v, 99.0)),
            ms(*v.last().unwrap_or(&Duration::ZERO))
        );
    }
    println!("cold / warm (p50): {ratio:.1}x   goal: cold p50 < 250 ms, p99 < 1000 ms");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<Duration> = (1..=20).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50.0), Duration::from_millis(10));
        assert_eq!(percentile(&v, 99.0), Duration::from_millis(20));
        assert_eq!(percentile(&v, 0.0), Duration::from_millis(1));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }
}
