//! `model ls`, `model rm`, `model pull`.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use nsml_manifest::format_size;
use nsml_proto::v1::{
    DeleteCheckpointRequest, GetSessionRequest, ListCheckpointsRequest, PullCheckpointRequest,
};

use super::Context;
use crate::archive;
use crate::json;
use crate::output::{Table, emit, now_ms, relative_time, summary};

pub async fn ls(ctx: &Context, session: &str, as_json: bool) -> Result<()> {
    let response = ctx
        .api()?
        .storage()
        .list_checkpoints(ListCheckpointsRequest {
            session: session.to_string(),
        })
        .await?
        .into_inner();
    // No checkpoint: say so only of a session that is there, not of a mistyped name.
    if response.checkpoints.is_empty() {
        ctx.api()?
            .session()
            .get(GetSessionRequest {
                name: session.to_string(),
            })
            .await?;
    }
    if as_json {
        json::print(&response.checkpoints.iter().map(json::checkpoint).collect());
        return Ok(());
    }
    let now = now_ms();
    let mut table = Table::new(&["Checkpoint", "Last Modified", "Elapsed", "Summary", "Size"]);
    for c in &response.checkpoints {
        table.row(vec![
            c.name.clone(),
            relative_time(c.saved_at_ms, now),
            format!("{:.3}", c.elapsed_secs),
            summary(&c.summary_json),
            format_size(c.size_bytes),
        ]);
    }
    emit(&table.render());
    Ok(())
}

pub async fn rm(ctx: &Context, session: &str, checkpoint: &str) -> Result<()> {
    let response = ctx
        .api()?
        .storage()
        .delete_checkpoint(DeleteCheckpointRequest {
            session: session.to_string(),
            checkpoint: checkpoint.to_string(),
        })
        .await?
        .into_inner();
    if response.deleted.is_empty() {
        println!("No checkpoint deleted");
    }
    for name in response.deleted {
        println!("Deleted {session}/{name}");
    }
    for name in response.kept {
        println!(
            "Kept {session}/{name}: it backs your team's best score on a board, and the competition keeps what \
             produced a board entry for reproducibility"
        );
    }
    Ok(())
}

/// The directory `model pull` extracts into when none is given: `./TEAM_DATASET_N_CHECKPOINT`.
pub fn default_pull_dir(session: &str, checkpoint: &str) -> PathBuf {
    PathBuf::from(format!("{}_{checkpoint}", session.replace('/', "_")))
}

pub async fn pull(
    ctx: &Context,
    session: &str,
    checkpoint: &str,
    path: Option<PathBuf>,
) -> Result<()> {
    if checkpoint.contains(['*', '?', '/']) {
        bail!(crate::UsageError(format!(
            "`{checkpoint}` is not a checkpoint name; pull one checkpoint at a time"
        )));
    }
    let dest = path.unwrap_or_else(|| default_pull_dir(session, checkpoint));
    let mut stream = ctx
        .api()?
        .storage()
        .pull_checkpoint(PullCheckpointRequest {
            session: session.to_string(),
            checkpoint: checkpoint.to_string(),
        })
        .await?
        .into_inner();

    // The archive is extracted while it downloads, on a blocking thread fed through a channel.
    let (sender, receiver) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    let target = dest.clone();
    let extraction =
        tokio::task::spawn_blocking(move || archive::extract(ChunkReader::new(receiver), &target));
    let mut download = Ok(());
    loop {
        match stream.message().await {
            Ok(Some(chunk)) => {
                if sender.send(chunk.data).await.is_err() {
                    // The extraction stopped; its error says why.
                    break;
                }
            }
            Ok(None) => break,
            Err(status) => {
                download = Err(status);
                break;
            }
        }
    }
    drop(sender);
    let extracted = extraction
        .await
        .context("extracting the checkpoint stopped")?;
    download?;
    let extracted = extracted?;
    for skipped in &extracted.skipped {
        eprintln!("Warning: skipped {skipped}: not a regular file or directory");
    }
    println!(
        "Pulled {session}/{checkpoint} into {} ({} files)",
        dest.display(),
        extracted.files
    );
    Ok(())
}

/// Reads the chunks a channel delivers as one byte stream.
struct ChunkReader {
    receiver: tokio::sync::mpsc::Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    offset: usize,
}

impl ChunkReader {
    fn new(receiver: tokio::sync::mpsc::Receiver<Vec<u8>>) -> Self {
        Self {
            receiver,
            chunk: Vec::new(),
            offset: 0,
        }
    }
}

impl std::io::Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.offset == self.chunk.len() {
            match self.receiver.blocking_recv() {
                Some(chunk) => {
                    self.chunk = chunk;
                    self.offset = 0;
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.offset);
        buf[..n].copy_from_slice(&self.chunk[self.offset..self.offset + n]);
        self.offset += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn pulls_default_to_a_directory_named_after_session_and_checkpoint() {
        assert_eq!(
            default_pull_dir("demo/t1-cls/3", "best"),
            PathBuf::from("demo_t1-cls_3_best")
        );
    }

    #[test]
    fn chunks_read_as_one_stream() {
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        sender.try_send(b"hel".to_vec()).unwrap();
        sender.try_send(Vec::new()).unwrap();
        sender.try_send(b"lo".to_vec()).unwrap();
        drop(sender);
        let mut text = String::new();
        ChunkReader::new(receiver)
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "hello");
    }
}
