// The housekeeping around a run's output paths, done once at start-up before any training step (docs/formats.md,
// "The --save directory"): an exclusive lock on the --save directory for the run's life, the removal of leftovers
// that killed processes left behind, and checks that every output path is usable, so that a mistake in one is
// found in seconds rather than after hours of training.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace nextron {

// An exclusive lock on a --save directory, held for the life of this object: flock() on `<dir>/.lock`, which also
// holds a line naming the holder ("pid P on host H since TIME") for the message a second run gets. The kernel
// releases a flock when its process dies, however it dies, so the lock of a killed run is simply taken over. The
// file is never deleted (deleting it would let two runs lock two different files of one name); a clean release
// empties it, so a run finding it non-empty knows its previous holder ended without releasing it.
class SaveDirLock {
 public:
  // Creates `dir` if needed. Throws nextron::Error naming the directory and the holder when another process
  // holds the lock. `previous_holder()` is the line a holder that died left in the file ("" after a clean release).
  explicit SaveDirLock(const std::string& dir);
  ~SaveDirLock();
  SaveDirLock(const SaveDirLock&) = delete;
  SaveDirLock& operator=(const SaveDirLock&) = delete;

  const std::string& previous_holder() const { return previous_holder_; }

 private:
  int fd_ = -1;
  std::string previous_holder_;
};

// The names of a --save directory's step directories, parsed in one place for the checkpoint loader and the
// housekeeping: step_<digits> (a checkpoint, complete or not), step_<digits>.tmp-<pid> (a save in progress, or
// killed), step_<digits>.del-<pid> (a checkpoint being deleted). pid is empty when the suffix is not a number.
struct StepDirName {
  enum class Kind { checkpoint, tmp, del } kind = Kind::checkpoint;
  int64_t step = 0;
  std::optional<int64_t> pid;
};
// Nothing for any other name.
std::optional<StepDirName> parse_step_dir_name(const std::string& name);

// A directory an interrupted process left behind: `step_<N>.tmp-<pid>` (a save), `step_<N>.del-<pid>` (keep-last
// deleting an old checkpoint, or a same-step replacement).
struct SaveLeftover {
  std::string path;
  int64_t pid = 0;
};

// The leftovers under `save_dir` (none when it does not exist).
std::vector<SaveLeftover> find_save_leftovers(const std::string& save_dir);

// Whether `pid` is a live process on this host (kill(pid, 0) does not fail with ESRCH). This process counts as
// dead: a leftover carrying its pid was left by an earlier process that had the same pid.
bool process_alive(int64_t pid);

// Total bytes of the regular files under `path` (or of `path` itself), and that as "12.3 MiB".
uint64_t disk_usage(const std::string& path);
std::string format_bytes(uint64_t bytes);

// Removes the leftovers of dead processes under `save_dir` and `<export_dir>.partial` (the temporary directory of
// an HF export that failed or was killed; its writer recreates it from scratch anyway) and returns one log line per
// path removed or, for a live process's leftover, kept. Either argument may be empty.
std::vector<std::string> remove_stale_leftovers(const std::string& save_dir, const std::string& export_dir);

// The step_<digits> checkpoint directories (complete or not) under `save_dir`, highest step first.
std::vector<std::string> existing_checkpoints(const std::string& save_dir);

// --overwrite-save: deletes every step_<digits> directory under `save_dir` (each renamed to .del-<pid> first, so a
// crash never leaves a half-deleted checkpoint that looks resumable) and `metrics` when it is not empty; returns one
// log line per removed path.
std::vector<std::string> clear_save_dir(const std::string& save_dir, const std::string& metrics);

// Start-up checks of the output paths; each throws nextron::Error naming the option, the path and the fix.
// --save: a directory or creatable as one (it is not created here).
void check_save_path(const std::string& dir);
// --metrics (or SAVE/metrics.jsonl): an appendable file, or creatable.
void check_metrics_path(const std::string& path);
// --export-hf: absent or an empty directory (the export never overwrites), creatable in a writable parent, and
// neither the --save directory nor the metrics file.
void check_export_path(const std::string& dir, const std::string& save_dir, const std::string& metrics);

// `path` without trailing separators ("out/hf/" -> "out/hf"), so that names derived from it ("<path>.partial") are
// siblings, not children.
std::string strip_trailing_separators(const std::string& path);

}  // namespace nextron
