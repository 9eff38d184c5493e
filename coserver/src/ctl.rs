//! `ftvm ctl`: the operator's client of a running CoServer's API (`control`).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use crate::cli::{CtlArgs, CtlCommand};
use crate::control::{self, ControlError, OperatorAction};

/// How long `ftvm ctl switchover` waits to see the peer primary.
const SWITCHOVER_WAIT: Duration = Duration::from_secs(30);

/// Errors of `ftvm ctl`.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The API.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The token file.
    #[error("token file {path}: {source}")]
    Token {
        /// The file.
        path: std::path::PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The switchover was accepted but did not complete in time.
    #[error("the switchover did not complete within {0:?}; see `ftvm ctl status`")]
    SwitchoverTimeout(Duration),
}

/// Runs `ftvm ctl`; the process exit code.
pub fn run(args: &CtlArgs) -> Result<i32, CtlError> {
    let token = match &args.token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|source| CtlError::Token {
                    path: path.clone(),
                    source,
                })?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let act = |a| control::act(&args.connect, a, token.as_deref());
    match args.command {
        CtlCommand::Status { json: true, .. } => {
            let status = control::fetch(&args.connect)?;
            println!(
                "{}",
                serde_json::to_string_pretty(&status).unwrap_or_default()
            );
        }
        CtlCommand::Status { watch: false, .. } => {
            print!("{}", control::render(&control::fetch(&args.connect)?));
        }
        CtlCommand::Status { watch: true, .. } => watch(&args.connect)?,
        CtlCommand::Switchover { no_wait } => {
            println!("{}", act(OperatorAction::Switchover)?);
            if !no_wait {
                wait_switchover(&args.connect)?;
            }
        }
        CtlCommand::Leave => println!("{}", act(OperatorAction::Leave)?),
        CtlCommand::Reload => println!("{}", act(OperatorAction::Reload)?),
        CtlCommand::ForcePrimary => println!("{}", act(OperatorAction::ForcePrimary)?),
    }
    Ok(0)
}

/// Redraws the status every second (on a terminal, in place) until interrupted or the
/// CoServer stops answering.
fn watch(addr: &str) -> Result<(), CtlError> {
    let terminal = std::io::stdout().is_terminal();
    loop {
        let status = control::fetch(addr)?;
        if terminal {
            // Home and clear: the status is drawn in place.
            print!("\x1b[H\x1b[2J");
        }
        print!("{}", control::render(&status));
        if !terminal {
            println!();
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Waits until the node at `addr` no longer runs the guest and hears its peer as the
/// primary.
fn wait_switchover(addr: &str) -> Result<(), CtlError> {
    let start = Instant::now();
    while start.elapsed() < SWITCHOVER_WAIT {
        if let Ok(s) = control::fetch(addr) {
            if s.role != "primary" && s.peer.role.as_deref() == Some("primary") && s.peer.alive {
                println!(
                    "switched over in {:.0} ms: {} is the primary; this node ({}) is {}",
                    start.elapsed().as_secs_f64() * 1000.0,
                    s.peer.name.as_deref().unwrap_or("the peer"),
                    s.node,
                    s.role
                );
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(CtlError::SwitchoverTimeout(SWITCHOVER_WAIT))
}
