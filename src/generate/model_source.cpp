#include "generate/model_source.h"

#include <filesystem>
#include <optional>
#include <vector>

#include "checkpoint/hf_checkpoint.h"
#include "checkpoint/train_checkpoint.h"
#include "core/error.h"

namespace nextron {

namespace fs = std::filesystem;

ModelSource open_model_source(const std::string& path) {
  NEXTRON_CHECK(fs::is_directory(path), "--model '", path,
                "' is not a directory: pass an HF checkpoint directory (config.json + safetensors), a training "
                "checkpoint (SAVE/step_N) or a training run's SAVE folder");
  ModelSource s;
  if (fs::exists(fs::path(path) / "manifest.json")) {
    s.kind = ModelSource::Kind::training;
    s.dir = path;
  } else if (fs::exists(fs::path(path) / "config.json")) {
    s.kind = ModelSource::Kind::hf;
    s.dir = path;
    s.config = read_hf_config(path);
    return s;
  } else {
    const std::optional<std::string> latest = find_latest_checkpoint(path);
    NEXTRON_CHECK(latest.has_value(), "--model '", path,
                  "' holds neither config.json (an HF checkpoint), manifest.json (a training checkpoint) nor a "
                  "complete step_N checkpoint (a training run's SAVE folder)");
    s.kind = ModelSource::Kind::training;
    s.dir = *latest;
  }
  s.config = read_train_checkpoint_config(s.dir);
  return s;
}

void load_model_weights(const ModelSource& source, Model& model) {
  // Read on the host, then one upload (the parameters may live on a GPU).
  const int64_t total = model.table().total_numel();
  std::vector<float> host(static_cast<size_t>(total));
  if (source.kind == ModelSource::Kind::hf) {
    load_hf_weights(source.dir, model.table(), host.data());
  } else {
    TrainCheckpointReader reader(source.dir);
    reader.check_model(model.config(), model.table());
    reader.read_params({FlatRun{0, 0, total}}, host.data());
  }
  model.ops().upload(model.params(), host.data(), host.size() * sizeof(float));
  model.params_changed();
}

}  // namespace nextron
