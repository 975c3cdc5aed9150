# Packaging tests of lgmalloc, included by the top-level CMakeLists.txt when it is the
# top-level project and BUILD_TESTING is on. Everything runs against an installed
# prefix, the way a user gets lgmalloc:
#
#   lgmalloc.install           cmake --install into <build>/test-prefix   (fixture setup)
#   lgmalloc.install_layout    files, symlinks, soname, exported symbols, no absolute paths
#   lgmalloc.consumer          c-tests/ via find_package() against test-prefix
#   lgmalloc.pkg_config        a program built with `pkg-config --cflags --libs lgmalloc`
#   lgmalloc.relocate          copies test-prefix to <build>/moved-prefix  (fixture setup)
#   lgmalloc.consumer_moved    c-tests/ against the moved prefix only
#   lgmalloc.pkg_config_moved  pkg-config consumer against the moved prefix
#   lgmalloc.subdirectory      c-tests/ with add_subdirectory(<this source tree>)

set(_lgt_prefix "${CMAKE_BINARY_DIR}/test-prefix")
set(_lgt_moved "${CMAKE_BINARY_DIR}/moved-prefix")
set(_lgt_consumer_options
    "-DCMAKE_C_COMPILER=${CMAKE_C_COMPILER}"
    "-DCMAKE_CXX_COMPILER=${CMAKE_CXX_COMPILER}"
    "-DLGMALLOC_EXPECT_OVERRIDE=${LGMALLOC_OVERRIDE}"
    "-DLGMALLOC_EXPECT_VERSION=${PROJECT_VERSION}")
set(_lgt_generator --build-generator "${CMAKE_GENERATOR}")
if(CMAKE_MAKE_PROGRAM)
  list(APPEND _lgt_generator --build-makeprogram "${CMAKE_MAKE_PROGRAM}")
endif()

add_test(NAME lgmalloc.install
  COMMAND "${CMAKE_COMMAND}" "-DBUILD_DIR=${CMAKE_BINARY_DIR}" "-DPREFIX=${_lgt_prefix}"
          "-DCONFIG=$<CONFIG>" -P "${CMAKE_CURRENT_SOURCE_DIR}/cmake/InstallPrefix.cmake")
set_tests_properties(lgmalloc.install PROPERTIES FIXTURES_SETUP lgmalloc_prefix)

find_program(LGMALLOC_READELF NAMES readelf llvm-readelf)
find_program(LGMALLOC_NM NAMES nm llvm-nm)
add_test(NAME lgmalloc.install_layout
  COMMAND "${CMAKE_COMMAND}"
          "-DPREFIX=${_lgt_prefix}"
          "-DSOURCE_DIR=${CMAKE_CURRENT_SOURCE_DIR}"
          "-DBUILD_DIR=${CMAKE_BINARY_DIR}"
          "-DLIBDIR=${CMAKE_INSTALL_LIBDIR}"
          "-DINCLUDEDIR=${CMAKE_INSTALL_INCLUDEDIR}"
          "-DBINDIR=${CMAKE_INSTALL_BINDIR}"
          "-DVERSION=${PROJECT_VERSION}"
          "-DSONAME=${LGMALLOC_SONAME}"
          "-DOVERRIDE=${LGMALLOC_OVERRIDE}"
          "-DREADELF=${LGMALLOC_READELF}"
          "-DNM=${LGMALLOC_NM}"
          -P "${CMAKE_CURRENT_SOURCE_DIR}/cmake/CheckInstall.cmake")
set_tests_properties(lgmalloc.install_layout PROPERTIES FIXTURES_REQUIRED lgmalloc_prefix)

# c-tests/ as a separate downstream project: configure, build, run its own ctest.
# lgmalloc_add_consumer_test(<name> <bindir> <ctest selection args> <cmake -D options...>)
function(lgmalloc_add_consumer_test name bindir selection)
  add_test(NAME ${name}
    COMMAND "${CMAKE_CTEST_COMMAND}" --build-and-test
            "${CMAKE_CURRENT_SOURCE_DIR}/c-tests" "${bindir}"
            ${_lgt_generator}
            --build-noclean
            --build-options ${_lgt_consumer_options} ${ARGN}
            --test-command "${CMAKE_CTEST_COMMAND}" --output-on-failure --timeout 300 ${selection})
  set_tests_properties(${name} PROPERTIES TIMEOUT 1800)
endfunction()

# The full suite once; the moved-prefix and add_subdirectory() builds build everything
# too but skip the long-running thread stress programs (already run here).
set(_lgt_all "")
set(_lgt_quick -E "^(threads|fork|thread_exit)_")
lgmalloc_add_consumer_test(lgmalloc.consumer "${CMAKE_BINARY_DIR}/c-tests" "${_lgt_all}"
  "-DCMAKE_PREFIX_PATH=${_lgt_prefix}" "-DLGMALLOC_EXPECT_PREFIX=${_lgt_prefix}")
set_tests_properties(lgmalloc.consumer PROPERTIES FIXTURES_REQUIRED lgmalloc_prefix)

add_test(NAME lgmalloc.relocate
  COMMAND "${CMAKE_COMMAND}" "-DFROM=${_lgt_prefix}" "-DTO=${_lgt_moved}"
          -P "${CMAKE_CURRENT_SOURCE_DIR}/cmake/CopyPrefix.cmake")
set_tests_properties(lgmalloc.relocate PROPERTIES
  FIXTURES_REQUIRED lgmalloc_prefix FIXTURES_SETUP lgmalloc_moved)

lgmalloc_add_consumer_test(lgmalloc.consumer_moved "${CMAKE_BINARY_DIR}/c-tests-moved" "${_lgt_quick}"
  "-DCMAKE_PREFIX_PATH=${_lgt_moved}" "-DLGMALLOC_EXPECT_PREFIX=${_lgt_moved}")
set_tests_properties(lgmalloc.consumer_moved PROPERTIES FIXTURES_REQUIRED lgmalloc_moved)

# The parent's cargo target dir is reused, so cargo finds the crate fresh.
lgmalloc_add_consumer_test(lgmalloc.subdirectory "${CMAKE_BINARY_DIR}/c-tests-subdir" "${_lgt_quick}"
  "-DLGMALLOC_SUBDIR=${CMAKE_CURRENT_SOURCE_DIR}"
  "-DLGMALLOC_OVERRIDE=${LGMALLOC_OVERRIDE}"
  "-DLGMALLOC_CARGO=${LGMALLOC_CARGO}"
  "-DLGMALLOC_CARGO_TARGET_DIR=${LGMALLOC_CARGO_TARGET_DIR}")
# Shares the cargo target dir with the main build: never at the same time as a build.
set_tests_properties(lgmalloc.subdirectory PROPERTIES RUN_SERIAL TRUE)

find_program(LGMALLOC_PKG_CONFIG NAMES pkg-config pkgconf)
if(LGMALLOC_PKG_CONFIG)
  foreach(kind IN ITEMS "" _moved)
    if(kind STREQUAL "")
      set(_p "${_lgt_prefix}")
      set(_f lgmalloc_prefix)
    else()
      set(_p "${_lgt_moved}")
      set(_f lgmalloc_moved)
    endif()
    add_test(NAME lgmalloc.pkg_config${kind}
      COMMAND "${CMAKE_COMMAND}"
              "-DPKG_CONFIG=${LGMALLOC_PKG_CONFIG}"
              "-DCC=${CMAKE_C_COMPILER}"
              "-DPREFIX=${_p}"
              "-DLIBDIR=${CMAKE_INSTALL_LIBDIR}"
              "-DVERSION=${PROJECT_VERSION}"
              "-DSOURCE=${CMAKE_CURRENT_SOURCE_DIR}/c-tests/pc_consumer.c"
              "-DWORK_DIR=${CMAKE_BINARY_DIR}/pkg-config-test${kind}"
              -P "${CMAKE_CURRENT_SOURCE_DIR}/cmake/PkgConfigTest.cmake")
    set_tests_properties(lgmalloc.pkg_config${kind} PROPERTIES FIXTURES_REQUIRED ${_f})
  endforeach()
else()
  message(STATUS "lgmalloc: pkg-config not found, the pkg-config consumer tests are skipped")
endif()
