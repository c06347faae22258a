//! Continuous traffic through the proxy, every request logged with the time it
//! was sent and which pod answered it (or why it failed).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::support::{client, send};

/// One request.
#[derive(Clone, Debug)]
pub struct Sent {
    pub at: Instant,
    /// The pod that answered, or the failure.
    pub result: Result<String, String>,
}

/// Clients sending requests in a loop until dropped.
pub struct Traffic {
    log: Arc<Mutex<Vec<Sent>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Traffic {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Traffic {
    /// `clients` keep-alive clients, each sending a request every `pause` at most.
    pub fn start(proxy: SocketAddr, clients: usize, pause: Duration) -> Traffic {
        let log = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..clients)
            .map(|_| {
                let log = log.clone();
                tokio::spawn(async move {
                    let c = client();
                    loop {
                        let at = Instant::now();
                        let req = http::Request::get(format!("http://{proxy}/")).body(Default::default());
                        let result = match req {
                            Ok(req) => match send(&c, req).await {
                                Ok(r) if r.status == 200 => Ok(r.backend().to_owned()),
                                Ok(r) => Err(format!("status {}: {}", r.status, r.body.trim())),
                                Err(e) => Err(e),
                            },
                            Err(e) => Err(e.to_string()),
                        };
                        log.lock().unwrap_or_else(|p| p.into_inner()).push(Sent { at, result });
                        tokio::time::sleep(pause).await;
                    }
                })
            })
            .collect();
        Traffic { log, tasks }
    }

    /// Requests sent at or after `from`.
    pub fn since(&self, from: Instant) -> Vec<Sent> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).iter().filter(|s| s.at >= from).cloned().collect()
    }

    /// Every failed request so far.
    pub fn failures(&self) -> Vec<Sent> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).iter().filter(|s| s.result.is_err()).cloned().collect()
    }

    /// Waits until `n` more requests have been answered after `from`, for at most 60 s.
    pub async fn wait_for(&self, from: Instant, n: usize) -> Vec<Sent> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let sent = self.since(from);
            if sent.len() >= n || Instant::now() >= deadline {
                return sent;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Requests per pod.
pub fn shares(sent: &[Sent]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for s in sent {
        if let Ok(pod) = &s.result {
            *m.entry(pod.clone()).or_insert(0) += 1;
        }
    }
    m
}
