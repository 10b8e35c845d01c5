// alignkd-mobile Android demo: the app (`:app`, Android) over a plain Kotlin/JVM core (`:core`, no Android
// dependency, unit-tested against the Python side's test vectors).
pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
}

dependencyResolutionManagement {
    repositoriesMode.set(RepositoriesMode.FAIL_ON_PROJECT_REPOS)
    repositories {
        google()
        mavenCentral()
    }
}

rootProject.name = "alignkd-android-demo"
include(":core", ":app")
