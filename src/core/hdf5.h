// Small RAII helpers for the HDF5 C API, shared by the dataset reader and the checkpoint writer.
#pragma once

#include <hdf5.h>

#include <cstdlib>
#include <utility>

namespace nextron {

// An HDF5 identifier closed by its own close function when it goes out of scope.
class H5Id {
 public:
  H5Id() = default;
  H5Id(hid_t id, herr_t (*close)(hid_t)) : id_(id), close_(close) {}
  H5Id(H5Id&& o) noexcept : id_(std::exchange(o.id_, H5I_INVALID_HID)), close_(o.close_) {}
  H5Id& operator=(H5Id&& o) noexcept {
    std::swap(id_, o.id_);
    std::swap(close_, o.close_);
    return *this;
  }
  H5Id(const H5Id&) = delete;
  H5Id& operator=(const H5Id&) = delete;
  ~H5Id() {
    if (id_ >= 0 && close_ != nullptr) close_(id_);
  }
  hid_t get() const { return id_; }
  bool valid() const { return id_ >= 0; }
  // Closes now and reports whether that worked; the handle is given up either way (HDF5 must never see a close
  // of it again), and closing an invalid handle reports failure without calling HDF5.
  bool close() {
    const hid_t id = std::exchange(id_, H5I_INVALID_HID);
    return id >= 0 && close_ != nullptr && close_(id) >= 0;
  }

 private:
  hid_t id_ = H5I_INVALID_HID;
  herr_t (*close_)(hid_t) = nullptr;
};

// A file access property list for files nextron writes: HDF5 1.10's file format (superblock version 3, version-2
// object headers), whose metadata carries checksums, so a damaged file is refused by HDF5 instead of being parsed
// (the 1.8-compatible default has no metadata checksums). The upper bound keeps the files readable by HDF5 1.10
// when a newer library writes them. Invalid when HDF5 cannot make one.
inline H5Id checksummed_format_access() {
  H5Id fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose);
#if H5_VERSION_GE(1, 10, 2)
  if (fapl.valid() && H5Pset_libver_bounds(fapl.get(), H5F_LIBVER_V110, H5F_LIBVER_V110) < 0) return H5Id();
#else  // 1.10.0/1.10.1 name the 1.10 format LATEST
  if (fapl.valid() && H5Pset_libver_bounds(fapl.get(), H5F_LIBVER_LATEST, H5F_LIBVER_LATEST) < 0) return H5Id();
#endif
  return fapl;
}

// Failures become nextron::Errors, so HDF5's own error-stack printing is off while we use the library.
class QuietHdf5 {
 public:
  QuietHdf5() {
    H5Eget_auto2(H5E_DEFAULT, &func_, &data_);  // initialises the library, registering its exit handler, first
    static const bool once = std::atexit(quiet_at_exit) == 0;
    (void)once;
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  }
  ~QuietHdf5() { H5Eset_auto2(H5E_DEFAULT, func_, data_); }
  QuietHdf5(const QuietHdf5&) = delete;
  QuietHdf5& operator=(const QuietHdf5&) = delete;

 private:
  // HDF5 1.10 leaks internal memory when a metadata checksum fails (a damaged file; every handle of ours is closed),
  // and its exit handler then gives up after 100 rounds and prints "HDF5: infinite loop closing library":
  // harmless, but alarming after our Error has explained the damage. Exit handlers run in reverse order of
  // registration, so this one, registered after the library's, turns that printing off first.
  static void quiet_at_exit() { H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr); }

  H5E_auto2_t func_ = nullptr;
  void* data_ = nullptr;
};

}  // namespace nextron
