//! The operator's actions on a running CoServer (from the control API): switchover,
//! leave, and reload of the configuration (a replacement peer's link addresses).

use super::{Node, NodeError};
use crate::config::Config;
use crate::control::OperatorAction;

impl Node {
    /// Answers the operator's requests waiting since the last turn.
    pub(super) fn operator_requests(&mut self) -> Result<(), NodeError> {
        while let Ok(request) = self.requests.try_recv() {
            let answer = self.operator(request.action)?;
            if let Err(why) = &answer {
                tracing::warn!(
                    action = request.action.name(),
                    "operator action refused: {why}"
                );
            }
            // The client may have given up waiting; nothing to do then.
            let _ = request.reply.send(answer);
            self.answered = Some(std::time::Instant::now());
        }
        Ok(())
    }

    fn operator(&mut self, action: OperatorAction) -> Result<Result<String, String>, NodeError> {
        match action {
            OperatorAction::Switchover => {
                let answer = self.session.lock().switchover();
                if let Ok(text) = &answer {
                    self.alert(text.clone());
                }
                // The epoch loop may be waiting; it cuts as usual.
                self.session.notify();
                Ok(answer)
            }
            OperatorAction::Leave => {
                let actions = self.session.lock().leave();
                match actions {
                    Ok(actions) => {
                        self.execute(actions)?;
                        Ok(Ok(
                            "leaving the pair: the primary runs on degraded; this CoServer exits"
                                .into(),
                        ))
                    }
                    Err(why) => Ok(Err(why)),
                }
            }
            OperatorAction::Reload => Ok(self.reload()),
            OperatorAction::ForcePrimary => {
                let actions = self.session.lock().force_primary();
                match actions {
                    Ok(actions) => {
                        self.execute(actions)?;
                        let s = self.session.lock();
                        Ok(match s.role() {
                            crate::protocol::Role::Primary => Ok(format!(
                                "this node runs the guest (generation {})",
                                s.generation()
                            )),
                            _ => Err(format!(
                                "the arbiter did not grant the guest: {}",
                                s.waiting().unwrap_or("see the alerts")
                            )),
                        })
                    }
                    Err(why) => Ok(Err(why)),
                }
            }
        }
    }

    /// Reads the configuration file again and applies what may change while running:
    /// the links' peer addresses. Anything else that changed refuses the whole reload.
    fn reload(&mut self) -> Result<String, String> {
        let new = Config::load(&self.config_path).map_err(|e| e.to_string())?;
        if let Some(what) = unchangeable_difference(&self.cfg, &new) {
            return Err(format!(
                "{what} changed in {}: a running CoServer takes new peer link addresses only (restart it for the rest; its guest never changes under it)",
                self.config_path.display()
            ));
        }
        let mut changed = Vec::new();
        for (i, (old, new)) in self.cfg.links.iter().zip(&new.links).enumerate() {
            if old.peer != new.peer {
                self.links
                    .set_peer(i, new.peer)
                    .map_err(|e| e.to_string())?;
                changed.push(format!("link{i} peer {} -> {}", old.peer, new.peer));
            }
        }
        self.cfg = new;
        let text = if changed.is_empty() {
            "configuration reloaded: nothing changed".to_string()
        } else {
            format!("configuration reloaded: {}", changed.join(", "))
        };
        self.alert(text.clone());
        Ok(text)
    }
}

/// The first setting other than a link's peer address in which `new` differs from
/// `old` (as a dotted path), if any.
fn unchangeable_difference(old: &Config, new: &Config) -> Option<String> {
    if old.links.len() != new.links.len() {
        return Some("the number of links".into());
    }
    if let Some(i) = old
        .links
        .iter()
        .zip(&new.links)
        .position(|(a, b)| a.local != b.local)
    {
        return Some(format!("link{i}'s local address"));
    }
    let mut with_old_peers = new.clone();
    for (l, o) in with_old_peers.links.iter_mut().zip(&old.links) {
        l.peer = o.peer;
    }
    let (Ok(a), Ok(b)) = (
        toml::Value::try_from(old),
        toml::Value::try_from(&with_old_peers),
    ) else {
        return Some("the configuration (it cannot be compared)".into());
    };
    first_difference(&a, &b, "")
}

fn first_difference(a: &toml::Value, b: &toml::Value, path: &str) -> Option<String> {
    match (a, b) {
        (toml::Value::Table(x), toml::Value::Table(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match (x.get(k), y.get(k)) {
                    (Some(v), Some(w)) => first_difference(v, w, &p),
                    (None, None) => None,
                    _ => Some(p),
                }
            })
        }
        _ if a == b => None,
        _ => Some(path.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ArbiterConfig, LinkConfig};

    fn config() -> Config {
        let link = |n: u8| LinkConfig {
            local: format!("10.1.{n}.1:7100").parse().unwrap(),
            peer: format!("10.1.{n}.2:7100").parse().unwrap(),
        };
        crate::config::test_support::config(
            "a",
            "/tmp/state".into(),
            vec![link(1), link(2)],
            ArbiterConfig::SharedStorage {
                path: "/tmp/arbiter".into(),
            },
        )
    }

    #[test]
    fn only_peer_addresses_may_change() {
        let old = config();
        let mut new = config();
        new.links[1].peer = "10.9.9.9:7100".parse().unwrap();
        assert_eq!(unchangeable_difference(&old, &new), None);
        let mut guest = new.clone();
        guest.guest.mem_mib = 128;
        assert_eq!(
            unchangeable_difference(&old, &guest).as_deref(),
            Some("guest.mem_mib")
        );
        let mut local = new.clone();
        local.links[0].local = "10.1.1.7:7100".parse().unwrap();
        assert_eq!(
            unchangeable_difference(&old, &local).as_deref(),
            Some("link0's local address")
        );
        let mut fewer = new.clone();
        fewer.links.pop();
        assert_eq!(
            unchangeable_difference(&old, &fewer).as_deref(),
            Some("the number of links")
        );
        let mut mode = new;
        mode.replication.mode = crate::protocol::ReplicationMode::Lockstep;
        assert_eq!(
            unchangeable_difference(&old, &mode).as_deref(),
            Some("replication.mode")
        );
    }
}
