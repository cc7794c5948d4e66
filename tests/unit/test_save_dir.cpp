// The --save directory's housekeeping (src/checkpoint/save_dir.h): the lock, leftovers of dead processes, the
// start-up checks of output paths. The end-to-end behaviour through nextron-train is in tools/test_train_faults.py.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>

#include "checkpoint/save_dir.h"
#include "core/error.h"

namespace nextron::test {
namespace {

namespace fs = std::filesystem;

fs::path fresh_dir(const std::string& name) {
  const fs::path p = fs::temp_directory_path() / ("nextron_save_dir_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

void write_bytes(const fs::path& p, size_t n) { std::ofstream(p) << std::string(n, 'x'); }

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// A pid that is certainly not running: a child that has exited and been reaped.
int64_t dead_pid() {
  const pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  ::waitpid(child, nullptr, 0);
  return child;
}

TEST(SaveDirLock, SecondHolderIsRefusedNamingTheFirst) {
  const fs::path dir = fresh_dir("lock");
  {
    SaveDirLock first(dir.string());
    EXPECT_EQ(first.previous_holder(), "");
    const std::string e = error_of([&] { SaveDirLock second(dir.string()); });
    EXPECT_NE(e.find("is in use by another nextron-train run"), std::string::npos) << e;
    EXPECT_NE(e.find(dir.string()), std::string::npos) << e;
    EXPECT_NE(e.find("pid " + std::to_string(::getpid()) + " on host"), std::string::npos) << e;
  }
  // Released cleanly: the file stays, empty, and the next holder finds no previous one.
  EXPECT_TRUE(fs::exists(dir / ".lock"));
  EXPECT_EQ(fs::file_size(dir / ".lock"), 0u);
  SaveDirLock again(dir.string());
  EXPECT_EQ(again.previous_holder(), "");
  fs::remove_all(dir);
}

TEST(SaveDirLock, ALineLeftByADeadHolderIsReported) {
  const fs::path dir = fresh_dir("stale");
  std::ofstream(dir / ".lock") << "pid 4711 on host elsewhere since 2024-01-01 00:00:00\n";
  SaveDirLock lock(dir.string());
  EXPECT_EQ(lock.previous_holder(), "pid 4711 on host elsewhere since 2024-01-01 00:00:00");
  fs::remove_all(dir);
}

TEST(SaveDirLeftovers, DeadProcessesOnesAreRemovedLiveOnesKept) {
  const fs::path dir = fresh_dir("leftovers");
  const int64_t dead = dead_pid();
  const fs::path tmp = dir / ("step_00000005.tmp-" + std::to_string(dead));
  const fs::path del = dir / ("step_00000003.del-" + std::to_string(dead));
  const fs::path live = dir / ("step_00000007.tmp-" + std::to_string(::getppid()));
  const fs::path mine = dir / ("step_00000009.tmp-" + std::to_string(::getpid()));  // an earlier process's
  for (const fs::path& p : {tmp, del, live, mine}) {
    fs::create_directories(p);
    write_bytes(p / "shard_00000.bin", 2048);
  }
  fs::create_directories(dir / "step_00000002");  // a checkpoint: never a leftover
  fs::create_directories(dir / "step_00000004.tmp-x");
  const fs::path exported = dir / "hf";
  fs::create_directories(exported.string() + ".partial");
  write_bytes(exported.string() + ".partial/model.safetensors", 100);

  EXPECT_EQ(find_save_leftovers(dir.string()).size(), 4u);
  const std::vector<std::string> log = remove_stale_leftovers(dir.string(), exported.string() + "/");
  EXPECT_FALSE(fs::exists(tmp));
  EXPECT_FALSE(fs::exists(del));
  EXPECT_FALSE(fs::exists(mine));
  EXPECT_FALSE(fs::exists(exported.string() + ".partial"));
  EXPECT_TRUE(fs::exists(live));
  EXPECT_TRUE(fs::exists(dir / "step_00000002"));
  EXPECT_TRUE(fs::exists(dir / "step_00000004.tmp-x"));
  ASSERT_EQ(log.size(), 5u);
  int removed = 0, kept = 0;
  for (const std::string& line : log) {
    removed += line.rfind("removed '", 0) == 0;
    kept += line.rfind("kept '" + live.string() + "'", 0) == 0;
  }
  EXPECT_EQ(removed, 4);
  EXPECT_EQ(kept, 1);
  EXPECT_NE(log[0].find("2.0 KiB"), std::string::npos) << log[0];
  fs::remove_all(dir);
}

TEST(SaveDirLeftovers, ProcessAlive) {
  EXPECT_TRUE(process_alive(::getppid()));
  EXPECT_FALSE(process_alive(::getpid()));  // a leftover with our pid is an earlier process's
  EXPECT_FALSE(process_alive(dead_pid()));
  EXPECT_FALSE(process_alive(0));
}

TEST(SaveDirCheckpoints, ListedHighestStepFirstAndCleared) {
  const fs::path dir = fresh_dir("clear");
  for (const char* name : {"step_00000002", "step_00000010", "step_123456789", "step_00000004.tmp-1", "other"})
    fs::create_directories(dir / name);
  write_bytes(dir / "metrics.jsonl", 10);
  const std::vector<std::string> found = existing_checkpoints(dir.string());
  ASSERT_EQ(found.size(), 3u);
  EXPECT_EQ(fs::path(found[0]).filename(), "step_123456789");
  EXPECT_EQ(fs::path(found[2]).filename(), "step_00000002");
  EXPECT_EQ(clear_save_dir(dir.string(), (dir / "metrics.jsonl").string()).size(), 4u);
  EXPECT_TRUE(existing_checkpoints(dir.string()).empty());
  EXPECT_FALSE(fs::exists(dir / "metrics.jsonl"));
  EXPECT_TRUE(fs::exists(dir / "other"));
  fs::remove_all(dir);
}

TEST(SaveDirChecks, OutputPathsAreCheckedNamingThePath) {
  const fs::path dir = fresh_dir("checks");
  const fs::path file = dir / "a_file";
  write_bytes(file, 1);
  fs::create_directories(dir / "full");
  write_bytes(dir / "full" / "x", 1);
  fs::create_directories(dir / "empty");

  EXPECT_NO_THROW(check_export_path((dir / "new" / "hf").string(), "", ""));
  EXPECT_NO_THROW(check_export_path((dir / "empty").string(), (dir / "save").string(), ""));
  EXPECT_NO_THROW(check_export_path((dir / "save" / "hf").string(), (dir / "save").string(), ""));
  std::string e = error_of([&] { check_export_path((dir / "full").string(), "", ""); });
  EXPECT_NE(e.find("not empty"), std::string::npos) << e;
  EXPECT_NE(e.find((dir / "full").string()), std::string::npos) << e;
  e = error_of([&] { check_export_path(file.string(), "", ""); });
  EXPECT_NE(e.find("existing file"), std::string::npos) << e;
  e = error_of([&] { check_export_path((file / "hf").string(), "", ""); });
  EXPECT_NE(e.find("is not a directory"), std::string::npos) << e;
  e = error_of([&] { check_export_path("/proc/nextron_no_such_dir/hf", "", ""); });
  EXPECT_NE(e.find("not writable"), std::string::npos) << e;
  e = error_of([&] { check_export_path((dir / "out").string(), (dir / "out" / "save").string(), ""); });
  EXPECT_NE(e.find("--save directory"), std::string::npos) << e;
  e = error_of([&] { check_export_path((dir / "out").string(), "", (dir / "out" / "m.jsonl").string()); });
  EXPECT_NE(e.find("metrics file"), std::string::npos) << e;

  EXPECT_NO_THROW(check_save_path((dir / "new_save").string()));
  e = error_of([&] { check_save_path(file.string()); });
  EXPECT_NE(e.find("not a directory"), std::string::npos) << e;
  EXPECT_NO_THROW(check_metrics_path(file.string()));
  e = error_of([&] { check_metrics_path((dir / "full").string()); });
  EXPECT_NE(e.find("is a directory"), std::string::npos) << e;
  EXPECT_FALSE(fs::exists(dir / "new"));  // checks create nothing
  EXPECT_FALSE(fs::exists(dir / "new_save"));
  fs::remove_all(dir);
}

TEST(SaveDirFormat, BytesAndPaths) {
  EXPECT_EQ(format_bytes(512), "512 bytes");
  EXPECT_EQ(format_bytes(20000), "19.5 KiB");
  EXPECT_EQ(format_bytes(uint64_t{3} << 30), "3.0 GiB");
  EXPECT_EQ(strip_trailing_separators("out/hf//"), "out/hf");
  EXPECT_EQ(strip_trailing_separators("/"), "/");
}

}  // namespace
}  // namespace nextron::test
